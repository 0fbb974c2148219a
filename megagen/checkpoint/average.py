"""Model averaging (Movie Gen's final step): the element-wise weighted mean of several checkpoints.

    megagen ckpt average CKPT1 CKPT2 ... --out DIR|FILE.safetensors [--weights w1,w2,...] [--ema]

    averaged[name] = Σ_i w_i · θ_i[name] / Σ_i w_i        (accumulated in float64, stored in the dtype saved)

Every input must hold the same spec, preset, parameter names and shapes. `--out` ending in
`.safetensors` writes an export file; otherwise a weights-only checkpoint directory (DCP tensors under
`model.*`, `megagen.json` with `kind=weights`, `COMPLETE`), which `checkpoint.init_from`, `ckpt export`
and `ckpt info` accept (not `checkpoint.resume`: it has no optimizer or data position). Inputs are read one
at a time, so memory holds the sum plus one checkpoint.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from megagen.checkpoint.layout import FORMAT, VERSION, CheckpointError, open_checkpoint, publish
from megagen.config.errors import UsageError


def parse_weights(text: str | None, n: int) -> list[float]:
    if not text:
        return [1.0] * n
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise CheckpointError("--weights", f"{text!r} is not a comma-separated list of numbers") from None
    if len(weights) != n:
        raise CheckpointError("--weights", f"{len(weights)} weights for {n} checkpoints")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise CheckpointError("--weights", "weights must be non-negative with a positive sum")
    return weights


def average_tensors(
    paths: list[str | Path], weights: list[float] | None = None, ema: bool = False, verify: str = "checksum"
):
    """(averaged tensors by name, metas of the inputs, resolved input dirs)."""
    from megagen.checkpoint.export import _prefix, read_tensors

    if len(paths) < 1:
        raise CheckpointError("CKPT", "nothing to average")
    weights = weights or [1.0] * len(paths)
    opened = [open_checkpoint(p, "CKPT", verify) for p in paths]
    first_dir, first = opened[0]
    for ckpt, meta in opened[1:]:
        if (meta.get("spec"), meta.get("preset")) != (first.get("spec"), first.get("preset")):
            raise CheckpointError(
                "CKPT",
                f"{ckpt} holds {meta.get('spec')}/{meta.get('preset')}, {first_dir} holds "
                f"{first.get('spec')}/{first.get('preset')}: only checkpoints of one model can be averaged",
            )
    acc: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for (ckpt, meta), w in zip(opened, weights):
        tensors = read_tensors(ckpt, _prefix(meta, ema, ckpt, "CKPT"))
        if not acc:
            acc = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in tensors.items()}
            dtypes = {k: v.dtype for k, v in tensors.items()}
        if tensors.keys() != acc.keys():
            diff = sorted(set(tensors) ^ set(acc))
            raise CheckpointError("CKPT", f"{ckpt}: parameter names differ from {first_dir}: {diff[:5]}")
        for k, v in tensors.items():
            if v.shape != acc[k].shape:
                raise CheckpointError(
                    "CKPT", f"{ckpt}: {k} is {tuple(v.shape)}, {first_dir} has {tuple(acc[k].shape)}"
                )
            acc[k].add_(v.double(), alpha=w)
        del tensors
    total = float(sum(weights))
    out = {k: (v / total).to(dtypes[k]) for k, v in acc.items()}
    return out, [m for _, m in opened], [str(c) for c, _ in opened]


def average_checkpoints(
    paths: list[str | Path],
    out: str | Path,
    weights: list[float] | None = None,
    ema: bool = False,
    verify: str = "checksum",
) -> Path:
    """`megagen ckpt average`: write the weighted mean of `paths` to `out` (a directory or .safetensors)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    weights = weights or [1.0] * len(paths)
    out = Path(out)
    if out.exists():
        raise UsageError("--out", f"{out} exists; refusing to overwrite it (remove it or choose another)")
    tensors, metas, sources = average_tensors(paths, weights, ema, verify)
    first = metas[0]
    steps = [m.get("step") for m in metas]
    if out.suffix == ".safetensors":
        from megagen.checkpoint.export import WEIGHTS_FORMAT, write_safetensors

        metadata = {
            "format": WEIGHTS_FORMAT,
            "spec": str(first.get("spec", "")),
            "preset": str(first.get("preset", "")),
            "step": str(max(s for s in steps if s is not None) if any(s is not None for s in steps) else ""),
            "weights": "ema-average" if ema else "average",
            "averaged_from": ",".join(sources),
            "average_weights": ",".join(repr(w) for w in weights),
        }
        return write_safetensors(tensors, out, metadata)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    dcp.save({"model": tensors}, storage_writer=FileSystemWriter(tmp, sync_files=True), no_dist=True)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "kind": "weights",
        "step": max((s for s in steps if s is not None), default=None),
        "spec": first.get("spec"),
        "preset": first.get("preset"),
        "mesh": {"world_size": 1, "dp_replicate": 1, "dp_shard": 1, "cp": 1, "tp": 1},
        "contents": ["model"],
        "averaged_from": sources,
        "average_weights": weights,
        "averaged_ema": ema,
        "config": first.get("config"),
        "torch": torch.__version__,
        "saved_at": time.time(),
    }
    publish(tmp, out, meta)
    return out
