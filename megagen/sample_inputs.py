"""`megagen sample`'s inputs: the prompt-embeddings file (read without running pickled code) and the batch
the spec's sampler gets from it. The file format is described in megagen/sample.py."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megagen.config import Config, ConfigError


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, dtypes, scalars and builtin containers; refuses every other global."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_npy_dict(path: Path) -> dict[str, np.ndarray]:
    """A `.npy` file written by `np.save(path, {name: array})`, read without running arbitrary pickles."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
        if dtype != np.dtype(object) or shape != ():
            raise ConfigError(
                "--prompt-embeddings", f"{path} holds one {dtype} array; expected a dict of arrays"
            )
        obj = _NumpyOnlyUnpickler(io.BytesIO(fh.read())).load()
    value = obj.item() if isinstance(obj, np.ndarray) else obj
    if not isinstance(value, dict):
        raise ConfigError("--prompt-embeddings", f"{path} holds a {type(value).__name__}, expected a dict")
    return value


def read_prompt_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """{name: tensor} from a `.safetensors`, `.npz` or dict-`.npy` file (floats as float32)."""
    p = Path(path)
    key = "--prompt-embeddings"
    if not p.is_file():
        raise ConfigError(key, f"file not found: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw: dict[str, Any] = load_file(str(p))
        elif p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as npz:
                raw = {k: npz[k] for k in npz.files}
        elif p.suffix == ".npy":
            raw = _read_npy_dict(p)
        else:
            raise ConfigError(key, f"{p}: unsupported file type (use .safetensors, .npz or a dict .npy)")
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable file ends in one line naming it
        raise ConfigError(key, f"{p} is not readable: {type(exc).__name__}: {exc}") from None
    out = {}
    for name, value in raw.items():
        t = torch.as_tensor(np.asarray(value)) if not isinstance(value, torch.Tensor) else value
        out[str(name)] = t.float() if t.is_floating_point() else t
    if not out:
        raise ConfigError(key, f"{p} holds no arrays")
    return out


def make_batch(
    spec, cfg: Config, arrays: dict[str, torch.Tensor], latent_shape: tuple[int, ...] | None = None
) -> dict[str, torch.Tensor]:
    """The sampler's batch: the file's arrays (with a batch dim) plus `latents` (zeros unless given)."""
    key = "--prompt-embeddings"
    shapes = spec.sample_shapes(cfg)
    required = [k for k in shapes if k != "latents"]
    missing = [k for k in required if k not in arrays]
    if missing:
        raise ConfigError(
            key,
            f"missing {missing} for spec {spec.name!r} (it needs {required}); the file has {sorted(arrays)}",
        )

    def per_sample_ndim(name: str) -> int | None:
        if name in shapes:
            return len(shapes[name])
        if name.startswith("text_valid.") and f"text.{name.split('.', 1)[1]}" in shapes:
            return 1
        return None

    unbatched = {
        n for n, t in arrays.items() if per_sample_ndim(n) is not None and t.dim() == per_sample_ndim(n)
    }
    known = {n for n in arrays if per_sample_ndim(n) is not None}
    if unbatched and unbatched != known:
        raise ConfigError(
            key, f"{sorted(unbatched)} lack the batch dimension that {sorted(known - unbatched)} have"
        )
    single = bool(unbatched)
    batch = {n: (t.unsqueeze(0) if single else t) for n, t in arrays.items()}
    for name in known:
        want = shapes.get(name)
        got = tuple(batch[name].shape[1:])
        if want is not None and (len(got) != len(want) or got[-1] != want[-1]):
            raise ConfigError(key, f"{name} has per-sample shape {got}; spec {spec.name!r} expects {want}")
    sizes = {n: t.shape[0] for n, t in batch.items() if t.dim() > 0}
    if len(set(sizes.values())) > 1:
        raise ConfigError(key, f"arrays disagree on the batch size: {sizes}")
    b = next(iter(sizes.values()))
    if any(n.startswith("text_valid.") for n in batch):  # masks for some encoders: all-true for the rest
        for name in [n for n in shapes if n.startswith("text.")]:
            valid = "text_valid." + name.split(".", 1)[1]
            batch[valid] = (
                batch[valid].bool() if valid in batch else torch.ones(batch[name].shape[:2], dtype=bool)
            )
    if "latents" not in batch:
        shape = tuple(latent_shape) if latent_shape else tuple(shapes["latents"])
        batch["latents"] = torch.zeros((b, *shape))
    elif latent_shape and tuple(batch["latents"].shape[1:]) != tuple(latent_shape):
        raise ConfigError("--latent-shape", f"{tuple(latent_shape)} disagrees with the file's latents")
    return batch
