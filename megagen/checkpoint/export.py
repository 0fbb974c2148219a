"""Consolidated weights: read a sharded checkpoint into full tensors, export them to one safetensors file.

    megagen ckpt export CKPT out.safetensors [--ema]
    megagen ckpt export CKPT OUT_DIR --format diffusers [--ema]

Offline and single-process: DCP reassembles every tensor from whatever mesh saved it. The safetensors
header carries `format=megagen-weights`, `spec`, `preset`, `step`, `weights` (model | ema) and `source`.
`--format diffusers` writes a `save_pretrained` directory instead (config.json + one safetensors file),
through the spec's diffusers table (external_format.py), for specs that have one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from megagen.checkpoint.layout import CheckpointError, open_checkpoint
from megagen.config.errors import UsageError

WEIGHTS_FORMAT = "megagen-weights"


def read_tensors(ckpt: Path, prefix: str = "model", key: str = "CKPT") -> dict[str, torch.Tensor]:
    """Every `<prefix>.*` tensor of a (validated) checkpoint as a full CPU tensor, by parameter name."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from megagen.checkpoint.safe_reader import SafeFileSystemReader, read_index

    index = read_index(ckpt, key)
    head = prefix + "."
    targets = {
        fqn[len(head) :]: torch.empty(tuple(md.size), dtype=md.properties.dtype)
        for fqn, md in index.state_dict_metadata.items()
        if fqn.startswith(head) and isinstance(md, TensorStorageMetadata)
    }
    if not targets:
        raise CheckpointError(key, f"{ckpt} holds no {prefix!r} tensors")
    dcp.load({prefix: targets}, storage_reader=SafeFileSystemReader(ckpt, key), no_dist=True)
    return targets


def _prefix(meta: dict, ema: bool, ckpt: Path, key: str) -> str:
    if ema and "ema" not in meta.get("contents", ["model"]):
        raise CheckpointError(key, f"{ckpt} has no EMA weights (train.ema_decay was 0)")
    return "ema" if ema else "model"


def load_checkpoint_weights(path: str | Path, ema: bool = False, key: str = "CKPT", verify: str = "checksum"):
    """(full weights by name, meta) of a checkpoint, verified first (`verify`: checksum | size)."""
    ckpt, meta = open_checkpoint(path, key, verify)
    return read_tensors(ckpt, _prefix(meta, ema, ckpt, key), key), meta


def write_safetensors(tensors: dict[str, torch.Tensor], out: str | Path, metadata: dict[str, str]) -> Path:
    """Write atomically (temporary file + rename); refuses to overwrite an existing file."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists():
        raise UsageError("OUT", f"{out} exists; refusing to overwrite it (remove it or choose another)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def export_safetensors(
    path: str | Path, out: str | Path, ema: bool = False, verify: str = "checksum"
) -> Path:
    """`megagen ckpt export`: consolidated full weights of checkpoint `path` into `out`."""
    ckpt, meta = open_checkpoint(path, "CKPT", verify)
    tensors = read_tensors(ckpt, _prefix(meta, ema, ckpt, "CKPT"))
    metadata = {
        "format": WEIGHTS_FORMAT,
        "spec": str(meta.get("spec", "")),
        "preset": str(meta.get("preset", "")),
        "step": str(meta.get("step", "")),
        "weights": "ema" if ema else "model",
        "source": str(ckpt),
    }
    if meta.get("config") is not None:
        metadata["config"] = json.dumps(meta["config"], sort_keys=True)
    return write_safetensors(tensors, out, metadata)


def read_safetensors(
    path: str | Path, key: str = "WEIGHTS"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header metadata) of a safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as exc:  # noqa: BLE001 - a clear error naming the file
        raise CheckpointError(key, f"{path} is not a readable safetensors file: {exc}") from None


def load_weights(model: nn.Module, path: str | Path, cfg=None) -> dict[str, str]:
    """Load an exported file into `model` (every name and shape must match); returns its metadata.

    With `cfg`, the file's spec and preset must be the config's.
    """
    from megagen.checkpoint.init_from import copy_full_into

    tensors, meta = read_safetensors(path)
    if cfg is not None and (meta.get("spec"), meta.get("preset")) != (cfg.model.spec, cfg.model.preset):
        raise CheckpointError(
            "WEIGHTS",
            f"{path} holds {meta.get('spec')}/{meta.get('preset')}, the config builds "
            f"{cfg.model.spec}/{cfg.model.preset}",
        )
    params = dict(model.named_parameters())
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise CheckpointError("WEIGHTS", f"{path}: missing {missing}, unexpected {unexpected}")
    for name, p in params.items():
        if tuple(p.shape) != tuple(tensors[name].shape):
            raise CheckpointError(
                "WEIGHTS", f"{path}: {name} is {tuple(tensors[name].shape)}, model {tuple(p.shape)}"
            )
    for name, p in params.items():
        copy_full_into(p, tensors[name])
    return meta


def _preset_arch(meta: dict, key: str):
    from megagen.specs.registry import get_spec

    spec = get_spec(str(meta.get("spec", "")))
    preset = str(meta.get("preset", ""))
    if preset not in spec.presets:
        raise CheckpointError(key, f"checkpoint preset {preset!r} is not a {spec.name} preset")
    return spec, spec.presets[preset]


def to_outside_tensors(tensors: dict[str, torch.Tensor], rules: dict, key: str) -> dict[str, torch.Tensor]:
    """Full megagen tensors → the outside format's tensors; every megagen tensor must have a rule."""
    from megagen.checkpoint.external_format import to_outside

    unmapped = sorted(set(tensors) - set(rules))
    if unmapped:
        raise CheckpointError(key, f"no outside counterpart for megagen tensors: {', '.join(unmapped)}")
    out: dict[str, torch.Tensor] = {}
    for name, rule in rules.items():
        if name not in tensors:
            raise CheckpointError(key, f"the checkpoint lacks {name}, which the export needs")
        out.update(to_outside(rule, tensors[name]))
    return out


def export_diffusers(path: str | Path, out: str | Path, ema: bool = False, verify: str = "checksum") -> Path:
    """`megagen ckpt export --format diffusers`: a directory `<Model>.from_pretrained(out)` loads."""
    from megagen.checkpoint.diffusers_dir import FORMAT, write_diffusers_dir
    from megagen.checkpoint.external_format import table_for

    ckpt, meta = open_checkpoint(path, "CKPT", verify)
    table = table_for(str(meta.get("spec", "")), FORMAT, "--format")
    spec, arch = _preset_arch(meta, "CKPT")
    tensors = read_tensors(ckpt, _prefix(meta, ema, ckpt, "CKPT"))
    outside = to_outside_tensors(tensors, table.tensor_rules(arch), "CKPT")
    return write_diffusers_dir(outside, table.outside_config(arch), out)
