"""Worker-side cases for meta-device construction: the initial weights a mesh builds, and what building
them costs in memory.

Every rank calls the same function on the pool's process group (or alone, for the reference).
"""

from __future__ import annotations

import ctypes
import gc
import math
import warnings

import torch
import torch.distributed as dist

from tests.distributed.cases_parity import config


def _runtime(cfg):
    from megagen.parallel.runtime import LocalRuntime
    from megagen.runtime_setup import distributed_runtime

    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    return distributed_runtime(cfg) if dist.is_initialized() else LocalRuntime()


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
    from megagen.train.gather import full_tensors

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
def _deep_video_spec():
    """The video spec with a deep preset: 24 blocks of width 768 hold 203 M parameters (774 MiB fp32), while
    the largest single parameter (`t_mod.weight`, 768 × 4608) is 13.5 MiB, so a quarter of the model plus
    that parameter is far below the full model."""
    from megagen.specs.video.model import VideoArch
    from megagen.specs.video.spec import TINY_TEXT, VideoSpec

    class DeepVideo(VideoSpec):
        name = "deep_video"
        presets = {
            "deep": VideoArch(
                layers=24, dim=768, ffn=1536, heads=8, max_latent_thw=(16, 32, 32), text_encoders=TINY_TEXT
            )
        }

    return DeepVideo()


DEEP_SPEC = _deep_video_spec()
DEEP = ["model.spec=tests.distributed.cases_meta_init:DEEP_SPEC", "model.preset=deep"]


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def _peak_rss_reset() -> int:
    """Return memory freed by earlier cases to the OS, reset the peak-RSS mark; returns RSS now (bytes)."""
    gc.collect()
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)  # fixed: tensors ≥ 1 MiB come from (and go back to) mmap
    libc.malloc_trim(0)
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
    largest full parameter and the full model (all fp32).

    A tiny model is built on the same mesh first: the first use of a kernel faults in pages of torch's
    shared libraries, which RSS counts (≈ 45 MB here), and that is not the model's memory.
    """
    from megagen.parallel.materialize import local_part, named_tensors

    cfg = config(overrides, "/tmp/megagen-meta-init-mem")
    _build(config([o for o in overrides if not o.startswith("model.")], "/tmp/megagen-meta-init-mem"))
    from megagen.specs import get_spec
    from megagen.train.build import build_model

    spec = get_spec(cfg.model.spec)
    spec.validate(cfg)
    runtime = _runtime(cfg)  # the process group and the mesh are not part of the build
    before = _peak_rss_reset()
    model = build_model(cfg, spec, runtime)
    peak = _status_kb("VmHWM") * 1024 - before
    named = named_tensors(model)
    shard = sum(local_part(t).numel() * local_part(t).element_size() for _, t in named)
    full = [t.numel() * t.element_size() for _, t in named]
    return {"peak": peak, "shard": shard, "largest": max(full), "model": sum(full)}


# ------------------------------------------------------------------------------------------------ init_from
def make_sources(directory: str) -> dict[str, str]:
    """One process: a 2-step video run with live init and another seed, saved as a DCP checkpoint and
    exported to safetensors (the `checkpoint.init_from` sources of the init_from cases)."""
    from megagen.checkpoint import export_safetensors
    from megagen.train import train

    overrides = ["run.seed=7", "checkpoint.every=2", "train.steps=2", "model.qk_norm=true"]
    train(config(overrides, directory))
    ckpt = f"{directory}/checkpoints/step-000002"
    return {"dcp": ckpt, "safetensors": str(export_safetensors(ckpt, f"{directory}/weights.safetensors"))}


class _CountingSlices:
    """Wraps a safetensors handle: counts the elements each read returns."""

    def __init__(self, handle, counter: list):
        self.handle, self.counter = handle, counter

    def __enter__(self):
        self.inner = self.handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self.handle.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def get_tensor(self, name):
        t = self.inner.get_tensor(name)
        self.counter.append(t.numel())
        return t

    def get_slice(self, name):
        outer = self

        class Slice:
            def __init__(self, inner):
                self.inner = inner

            def get_shape(self):
                return self.inner.get_shape()

            def __getitem__(self, index):
                t = self.inner[index]
                outer.counter.append(t.numel())
                return t

        return Slice(self.inner.get_slice(name))


def init_from_weights(overrides: list[str], source: str) -> dict:
    """Build a trainer that starts from `source` (`checkpoint.init_from`); the gathered parameters on
    rank 0, and on every rank the elements it read from a safetensors source next to what it needs: its
    shards of the loaded tensors, and the saved (smaller) tensor of each grown one, which is read whole."""
    from unittest import mock

    import safetensors

    from megagen.checkpoint import attach_checkpointing
    from megagen.parallel.materialize import local_part
    from megagen.train.gather import full_tensors
    from megagen.train.loop import Trainer

    cfg = config([*overrides, f"checkpoint.init_from={source}", "checkpoint.every=0"], "/tmp/megagen-initf")
    trainer = Trainer(cfg, _runtime(cfg))
    read: list[int] = []
    real = safetensors.safe_open
    with mock.patch.object(safetensors, "safe_open", lambda *a, **k: _CountingSlices(real(*a, **k), read)):
        hook = attach_checkpointing(trainer)
    report = hook.init_report
    named = list(trainer.model.named_parameters())
    local = sum(local_part(p).numel() for n, p in named if n in report.loaded)
    local += sum(math.prod(old) for old, _, _ in report.grown.values())  # a grown tensor is read whole
    out = {"read": sum(read), "local": local, "loaded": report.loaded, "grown": sorted(report.grown)}
    params = full_tensors(named)
    if not dist.is_initialized() or dist.get_rank() == 0:
        out["params"] = params
    return out
