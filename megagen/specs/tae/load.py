"""Load a trained TAE for inference (`megagen data encode`, `megagen sample --tae`).

A TAE checkpoint is either a megagen DCP checkpoint (a checkpoint directory, or a run/checkpoint root
whose latest complete checkpoint is taken) or the single safetensors file of `megagen ckpt export`. Both
are read without unpickling (DCP's safe reader, safetensors). The spec and preset come from the
checkpoint's own metadata, so the caller needs no config.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from megagen.checkpoint.layout import CheckpointError

TAE_SPEC_NAME = "tae"


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from megagen.checkpoint.export import load_checkpoint_weights, read_safetensors

    if path.is_file():
        return read_safetensors(path, "TAE")
    return load_checkpoint_weights(path, key="TAE")


def load_tae(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """(TAE in eval mode on `device`, {"preset", "latent_channels", "compression", "path"})."""
    from megagen.specs.tae.model import TAE
    from megagen.specs.tae.spec import TAE_PRESETS

    path = Path(path)
    tensors, meta = _read(path)
    spec, preset = str(meta.get("spec", "")), str(meta.get("preset", ""))
    if spec != TAE_SPEC_NAME:
        raise CheckpointError("TAE", f"{path} holds a {spec or 'unknown'!r} model, not a TAE")
    if preset not in TAE_PRESETS:
        known = ", ".join(TAE_PRESETS)
        raise CheckpointError("TAE", f"{path}: unknown TAE preset {preset!r}; known: {known}")
    arch = TAE_PRESETS[preset]
    tae = TAE(arch)
    missing, unexpected = tae.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise CheckpointError("TAE", f"{path}: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    tae.to(device).eval().requires_grad_(False)
    info = {
        "preset": preset,
        "latent_channels": arch.latent_channels,
        "compression": arch.compression,
        "path": str(path),
    }
    return tae, info


def tiny_tae_for_tests(tmp_dir: str | Path, seed: int = 0) -> Path:
    """A randomly initialised tiny TAE saved as an exported safetensors file; returns its path."""
    from megagen.checkpoint.export import WEIGHTS_FORMAT, write_safetensors
    from megagen.specs.tae.model import TAE
    from megagen.specs.tae.spec import TAE_PRESETS

    out = Path(tmp_dir) / "tae_tiny.safetensors"
    if out.exists():
        return out
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tae = TAE(TAE_PRESETS["tiny"])
    metadata = {"format": WEIGHTS_FORMAT, "spec": TAE_SPEC_NAME, "preset": "tiny", "weights": "model"}
    return write_safetensors(dict(tae.state_dict()), out, metadata)
