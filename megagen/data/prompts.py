"""`megagen data prompts CONFIG --out FILE`: a stand-in prompt-embeddings file for `megagen sample`.

Real prompts come from the frozen text encoders upstream (UL2, ByT5, MetaCLIP for video; T5 for audio).
This writes seeded random embeddings with exactly the names and shapes the config's spec reads
(`text.<encoder>` (B, L, width) from its `sample_shapes`, plus a `text_valid.<encoder>` mask of ones), so
`megagen sample` can be tried, and a real file's layout copied from it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from megagen.config.errors import UsageError


def write_prompt_embeddings(cfg, out: str | Path, count: int = 2, seed: int = 0) -> dict[str, tuple]:
    """Write `count` random prompts for `cfg`'s spec to `out` (.npz or .safetensors); returns the shapes."""
    from megagen.specs import get_spec

    out = Path(out)
    if out.suffix not in (".npz", ".safetensors"):
        raise UsageError("--out", f"{out}: use a .npz or .safetensors file name")
    spec = get_spec(cfg.model.spec)
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, shape in spec.sample_shapes(cfg).items():
        if not name.startswith("text."):
            continue
        arrays[name] = rng.standard_normal((count, *shape)).astype(np.float32)
        arrays["text_valid." + name.split(".", 1)[1]] = np.ones((count, shape[0]), dtype=bool)
    if not arrays:
        raise UsageError("CONFIG", f"spec {cfg.model.spec!r} reads no text embeddings")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npz":
        np.savez(out, **arrays)
    else:
        from safetensors.numpy import save_file

        save_file(arrays, str(out))
    return {k: v.shape for k, v in arrays.items()}
