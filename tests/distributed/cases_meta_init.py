"""Worker-side cases for meta-device construction: the initial weights a mesh builds, and what building
them costs in memory.

Every rank calls the same function on the pool's process group (or alone, for the reference).
"""

from __future__ import annotations

import ctypes
import gc
import warnings

import torch
import torch.distributed as dist

from tests.distributed.cases_parity import config


def _runtime(cfg):
    from megagen.parallel.runtime import DistributedRuntime, LocalRuntime

    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    return DistributedRuntime(cfg) if dist.is_initialized() else LocalRuntime()


def _build(cfg):
    from megagen.specs import get_spec
    from megagen.train.build import build_model

    spec = get_spec(cfg.model.spec)
    spec.validate(cfg)
    runtime = _runtime(cfg)
    return build_model(cfg, spec, runtime), runtime


def initial_weights(overrides: list[str]) -> dict:
    """The gathered full parameters and buffers right after building (no step taken), on rank 0; every
    rank also checks that each local shard is `local_slice` of the gathered tensor (the layout the
    materialiser writes is the one DTensor/FSDP2 read back)."""
    from megagen.parallel.materialize import local_part, local_slice, named_tensors
    from megagen.train.loop import full_tensors

    cfg = config(overrides, "/tmp/megagen-meta-init")
    model, _ = _build(cfg)
    named = named_tensors(model)
    full = full_tensors(named)
    for name, t in named:
        if not torch.equal(local_part(t).cpu(), local_slice(full[name], t)):
            raise AssertionError(f"rank {dist.get_rank() if dist.is_initialized() else 0}: {name} shard")
    placements = {n: str(getattr(t, "placements", "")) for n, t in named}
    if not dist.is_initialized() or dist.get_rank() == 0:
        return {"tensors": full, "placements": placements}
    return {}


# ------------------------------------------------------------------------------------------------ memory
def _peak_rss_reset() -> int:
    """Return memory freed by earlier cases to the OS, reset the peak-RSS mark; returns RSS now (bytes)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as fh:  # "5": reset VmHWM to the current RSS
        fh.write("5")
    return _status_kb("VmRSS") * 1024


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def build_peak(overrides: list[str]) -> dict:
    """Peak RSS growth while building this rank's model, next to the bytes of its local shards, the
    largest full parameter and the full model (all fp32)."""
    from megagen.parallel.materialize import local_part, named_tensors

    cfg = config(overrides, "/tmp/megagen-meta-init-mem")
    runtime = _runtime(cfg)  # the process group and mesh are not part of the build
    from megagen.specs import get_spec
    from megagen.train.build import build_model

    spec = get_spec(cfg.model.spec)
    spec.validate(cfg)
    before = _peak_rss_reset()
    model = build_model(cfg, spec, runtime)
    peak = _status_kb("VmHWM") * 1024 - before
    named = named_tensors(model)
    shard = sum(local_part(t).numel() * local_part(t).element_size() for _, t in named)
    full = [t.numel() * t.element_size() for _, t in named]
    return {"peak": peak, "shard": shard, "largest": max(full), "model": sum(full)}
