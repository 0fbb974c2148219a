"""`megagen bench`: warm-up, then timed steps; throughput, TFLOP/s, MFU/HFU, memory, wait and comm shares.

Step times are device-synchronised (the loop synchronises before stopping its timer). Figures are per
device. The same numbers are logged during training; bench only adds warm-up exclusion and medians.
"""

from __future__ import annotations

import json
import statistics
import sys

from megagen.config import Config


def resolved_mesh(cfg: Config, runtime) -> dict:
    """The mesh that ran: axis sizes with `dp_shard=-1` resolved (1 everywhere in one process)."""
    dims = getattr(runtime, "dims", None)
    sizes = dims.sizes() if dims is not None else {"dp_replicate": 1, "dp_shard": 1, "cp": 1, "tp": 1}
    return {**sizes, "cp_kind": cfg.parallel.cp_kind}


def exposed_comm_per_axis(timed: list[dict]) -> dict[str, float | None]:
    """{axis: median seconds per step waited on its collectives}; None where a step could not measure it
    (FSDP2's waits on Work handles are invisible to the accounting)."""
    axes = sorted({axis for r in timed for axis in r.get("comm_exposed_s", {})})
    out: dict[str, float | None] = {}
    for axis in axes:
        values = [r.get("comm_exposed_s", {}).get(axis, 0.0) for r in timed]
        out[axis] = None if any(v is None for v in values) else statistics.median(values)
    return out


def run_bench(cfg: Config, steps: int, warmup: int, runtime=None) -> dict:
    """Train `warmup + steps` steps and summarise the timed ones (medians)."""
    from megagen.train.loop import Trainer

    cfg.train.steps = warmup + steps
    cfg.metrics.mfu = True
    cfg.metrics.comm = True
    cfg.metrics.tensorboard = False
    cfg.metrics.jsonl = False
    cfg.metrics.progress = "none"
    cfg.checkpoint.every = 0
    trainer = Trainer(cfg, runtime)
    trainer.run()
    timed = trainer.history[warmup:]
    world = trainer.runtime.world_size

    def med(key: str) -> float:
        return statistics.median(r[key] for r in timed)

    step = med("step_time_s")
    peak = trainer.runtime.device.type
    result = {
        "config": cfg.run.name or cfg.model.spec + "/" + cfg.model.preset,
        "device": peak,
        "world_size": world,
        "mesh": resolved_mesh(cfg, trainer.runtime),
        "steps_timed": len(timed),
        "step_time_s": step,
        "step_time_spread": (max(r["step_time_s"] for r in timed) - min(r["step_time_s"] for r in timed))
        / step,
        "tokens_per_s_per_device": med("tokens_per_s") / world,
        "samples_per_s_per_device": med("samples_per_s") / world,
        "tflops_per_device": med("tflops"),
        "mfu": med("mfu"),
        "peak_tflops": timed[-1]["peak_tflops"],
        "hfu": med("hfu"),
        "peak_memory_gb": max(r["max_mem_gb"] for r in timed),
        "data_wait_share": statistics.median(r["data_wait_s"] / r["step_time_s"] for r in timed),
        "comm_share": statistics.median(r.get("comm_s", 0.0) / r["step_time_s"] for r in timed),
        "comm_bytes_per_step": timed[-1].get("comm_bytes", {}),
        "exposed_comm_s": exposed_comm_per_axis(timed),
    }
    return result


def print_bench(result: dict, as_json: bool, stream=None) -> None:
    stream = stream or sys.stdout
    if as_json:
        stream.write(json.dumps(result) + "\n")
        return
    for key, value in result.items():
        shown = f"{value:.4g}" if isinstance(value, float) else value
        stream.write(f"{key:28s} {shown}\n")
