"""`megagen rehearse`: play one rank of an N-rank job in this process and measure it against the planner.

Why: a 6,144-GPU launch that fails on memory or start-up time wastes a cluster's hour; most of what decides
it — the sharded model's bytes, the optimizer state, the data plan, the code path of a step — does not need
the other ranks' data. torch's fake process group gives this process rank R of world N with collectives
that move nothing, so the real build (meta device, TP/CP/FSDP), optimizer, data plan and a few training
steps run here, at a short sequence (`data.latent_*`), and the per-rank bytes are measured beside the
planner's prediction for the same layout. Values are not meaningful (peers' data never arrives); bytes,
shapes and the code path are those of the real job.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import sys
import tempfile
import time
import warnings

from megagen.config import ConfigError, load_config
from megagen.parallel.overlap_schedule import overlap_on

QUIET = [
    "train.step_timeout_s=0",  # no peers to wait for: the watchdog has nothing to watch
    "metrics.jsonl=false",
    "metrics.tensorboard=false",
    "metrics.progress=none",
    "metrics.mfu=false",
    "metrics.comm=false",
    "checkpoint.every=0",
    "eval.every=0",
]
LAUNCH_DEVICE = "cuda"
"""The device of the launch a rehearsal plays a rank of (it runs on CPU): settings that depend on the
device, like `parallel.overlap=auto`, are decided as that launch decides them."""
CATEGORIES = ("params", "grads", "optimizer", "activations_peak", "comm_buffers")


def return_large_frees_to_the_system() -> bool:
    """Fix glibc's mmap threshold at 1 MiB (where glibc is the allocator); returns whether it applied.

    Why: glibc raises the threshold after each large free (up to 32 MiB), so the per-parameter storages
    FSDP gathers and frees for every block come back from the heap, fragment it, and the process's RSS
    grows block by block (1b at 64 ranks: 4.2 GB peak vs 1.2 GB with a fixed threshold). A GPU's caching
    allocator does not behave so; the rehearsal's peak RSS should count what the rank holds.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 1 << 20))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def start_fake_world(world_size: int, rank: int) -> None:
    """This process becomes rank `rank` of `world_size` on torch's fake process group."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError("--rank", f"rank {rank} is not in a world of {world_size} ranks")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)


def _nbytes(t) -> int:
    t = getattr(t, "_local_tensor", t)
    return t.numel() * t.element_size()


def fsdp_buffer_bytes(model, param_dtype: str, reduce_dtype: str) -> int | None:
    """FSDP's buffers at their peak, from the real sharded model: its largest block unit's all-gather
    output (padded shard × shard-group size) twice (current + prefetched) in the compute dtype, and once
    in the reduce dtype (the unsharded gradient its reduce-scatter sends). None without FSDP."""
    from torch.distributed.fsdp import FSDPModule

    from megagen.parallel.planner.plan_point import DTYPE_BYTES as size
    units = []
    for m in model.modules():
        group = m._get_fsdp_state()._fsdp_param_group if isinstance(m, FSDPModule) else None
        if group is None or m is model:
            continue
        shards = group.mesh_info.shard_mesh_size
        units.append(sum(p.padded_sharded_param_size.numel() for p in group.fsdp_params) * shards)
    if not units:
        return None
    return max(units) * (2 * size[param_dtype] + size[reduce_dtype])


def _micro_batch(sampler) -> int:
    return min(b.micro_batch for b in sampler.buckets.values())


def predicted_bytes(cfg, work, world_size: int, micro_batch: int, shard: int = 0) -> dict[str, float]:
    """The planner's bytes for this config's layout at the rehearsed sequence and micro-batch, on the ranks
    of FSDP shard index `shard` (the rank's place on the flattened dp_shard × cp axis)."""
    from megagen.parallel.planner.cost import activation_bytes
    from megagen.parallel.planner.memory import fsdp_buffer_bytes as fsdp_buffer_bytes_predicted
    from megagen.parallel.planner.memory import state_memory
    from megagen.planning import plan_point_for_config

    plan = plan_point_for_config(cfg, world_size, LAUNCH_DEVICE, micro_batch=micro_batch)
    params, grads, optimizer = state_memory(work, plan, shard)
    return {
        "params": params,
        "grads": grads,
        "optimizer": optimizer,
        "activations_peak": activation_bytes(work, plan)[0],
        # FSDP wraps the model whenever any data-parallel or cp axis is larger than one
        "comm_buffers": (
            fsdp_buffer_bytes_predicted(work, plan) if plan.dp_replicate * plan.fsdp > 1 else None
        ),
    }


def rehearsal_config(config: str, overrides: list[str], steps: int):
    """The config a rehearsal runs: the user's, quiet, `steps` long in a scratch run.dir, its
    device-dependent settings decided for `LAUNCH_DEVICE`."""
    if steps < 1:
        raise ConfigError("--steps", f"must be at least 1, got {steps}")
    run_dir = tempfile.mkdtemp(prefix="megagen-rehearse-")
    cfg = load_config(config, [*overrides, *QUIET, f"train.steps={steps}", f"run.dir={run_dir}"])
    cfg.parallel.overlap = overlap_on(cfg.parallel.overlap, LAUNCH_DEVICE)
    return cfg


def rehearse(config: str, overrides: list[str], world_size: int, rank: int = 0, steps: int = 1) -> dict:
    """Run the rehearsal; the report `--json` prints (see the module docstring)."""
    from megagen.data.pipeline import build_data
    from megagen.metrics.activation_meter import ActivationMeter, measures
    from megagen.plan_validate import watch_gradient_peak
    from megagen.planning import workload_for_config
    from megagen.runtime_setup import distributed_runtime
    from megagen.train.loop import Trainer

    cfg = rehearsal_config(config, overrides, steps)
    start_fake_world(world_size, rank)
    return_large_frees_to_the_system()
    warnings.filterwarnings("ignore", message=r".*fake.*")
    runtime = distributed_runtime(cfg)
    trainer = Trainer(cfg, runtime, weights="draw")
    phases = dict(trainer.startup_s)
    t0 = time.perf_counter()
    data = build_data(cfg, trainer.spec, runtime, steps)
    next(iter(data.loader))
    phases["data_plan"] = time.perf_counter() - t0
    micro = _micro_batch(data.sampler)
    grad_peak = watch_gradient_peak(runtime)
    meter = ActivationMeter()
    with meter.watching(trainer.model):
        trainer.run()
    phases["first_step"] = trainer.history[0]["step_time_s"]
    measured = {
        "params": sum(_nbytes(p) for p in trainer.model.parameters()),
        "grads": grad_peak["bytes"],
        "optimizer": sum(
            _nbytes(v) for st in trainer.optimizer.state.values() for v in st.values() if v.dim() > 0
        ),
        "activations_peak": meter.peak_bytes if measures(cfg.train.recompute) else None,
        "comm_buffers": fsdp_buffer_bytes(trainer.model, cfg.parallel.param_dtype, cfg.parallel.reduce_dtype),
    }
    dims = runtime.dims
    work = workload_for_config(cfg)  # the planner's trace of this config, once
    report = {
        "world_size": world_size,
        "rank": rank,
        "mesh": {a: getattr(dims, a) for a in ("dp_replicate", "dp_shard", "cp", "tp")},
        "model": f"{cfg.model.spec}/{cfg.model.preset}",
        "tokens": work.tokens,
        "micro_batch": micro,
        "bytes": measured,
        "predicted": predicted_bytes(cfg, work, world_size, micro, runtime.mesh.local_rank("dp_shard_cp")),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "phases_s": {k: round(phases[k], 3) for k in ("build", "init", "data_plan", "first_step")},
    }
    report["relative_error"] = {
        k: _relative(measured[k], report["predicted"][k]) for k in CATEGORIES
    }
    return report


def _relative(measured: float | None, predicted: float | None) -> float | None:
    if measured is None or predicted is None:
        return None
    if measured == predicted:
        return 0.0
    return (predicted - measured) / measured if measured else float("inf")


def _gb(n: float | None) -> str:
    if n is None:
        return "—"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def format_report(r: dict) -> str:
    mesh = " × ".join(f"{k}{v}" for k, v in r["mesh"].items() if v > 1) or "one rank"
    lines = [
        f"rehearsal of {r['model']}: rank {r['rank']} of {r['world_size']} ({mesh}), "
        f"{r['tokens']} tokens per sample, micro-batch {r['micro_batch']}",
        f"{'per rank':22s}{'measured':>14s}{'predicted':>14s}{'error':>9s}",
    ]
    for k in CATEGORIES:
        err = r["relative_error"][k]
        shown = "—" if err is None else "exact" if err == 0 else f"{100 * err:+.1f}%"
        lines.append(f"{k:22s}{_gb(r['bytes'][k]):>14s}{_gb(r['predicted'][k]):>14s}{shown:>9s}")
    p = r["phases_s"]
    lines.append(f"peak RSS {r['peak_rss_gb']:.2f} GB")
    lines.append(
        "phases: " + ", ".join(f"{k} {p[k]:.1f} s" for k in ("build", "init", "data_plan", "first_step"))
    )
    if r["bytes"]["activations_peak"] is None:
        lines.append("activations: not measured under train.recompute (checkpointing hides saved tensors)")
    lines.append(
        "init: tensors over 1M elements were drawn locally (a launch replays each one whole on its device)"
    )
    return "\n".join(lines)


def add_rehearse_command(sub) -> None:
    from megagen.cli import TRAIN_EPILOG, add_config_arguments

    r = sub.add_parser(
        "rehearse",
        help="play one rank of an N-rank job in this process: real sharded model, optimizer, data plan and "
        "steps on a fake process group; bytes per rank beside the planner's prediction",
        description="Scale rehearsal: this process plays rank R of an N-rank job on torch's fake process "
        "group (collectives move no data). Keep the sequence short with data.latent_* overrides.",
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(r)
    r.add_argument("--world-size", type=int, required=True, help="ranks in the rehearsed job")
    r.add_argument("--rank", type=int, default=0, help="the rank this process plays (default 0)")
    r.add_argument("--steps", type=int, default=1, help="training steps to run (default 1)")
    r.add_argument("--json", action="store_true", help="print one JSON object")


def run_rehearse_command(args) -> int:
    report = rehearse(args.config, args.overrides, args.world_size, args.rank, args.steps)
    sys.stdout.write((json.dumps(report) if args.json else format_report(report)) + "\n")
    return 0
