"""`megagen plan --validate`: run a config for a few steps and set its measured traffic and memory beside
the planner's prediction (exact equality expected for bytes and parameter/gradient/optimizer memory).

It lives on the CLI side: it runs the trainer, which the engine (parallel/) must not import.
"""

from __future__ import annotations

import json
import sys

# A short run that counts collectives and writes nothing.
VALIDATE_OVERRIDES = [
    "train.steps=2",
    "metrics.comm=true",
    "metrics.jsonl=false",
    "metrics.tensorboard=false",
    "metrics.progress=none",
    "checkpoint.every=0",
]


def watch_gradient_peak(runtime) -> dict[str, int]:
    """Make `runtime` record the most gradient bytes held (`fsdp.held_gradient_bytes`) at every micro-batch
    boundary — before each micro-batch and after the last backward — into the returned {"bytes": n}."""
    from megagen.parallel.fsdp import held_gradient_bytes

    peak = {"bytes": 0}

    def measuring(hook):
        def call(model, *args, **kwargs):
            peak["bytes"] = max(peak["bytes"], held_gradient_bytes(model))
            return hook(model, *args, **kwargs)

        return call

    for name in ("set_grad_sync", "finish_grads"):
        setattr(runtime, name, measuring(getattr(runtime, name)))
    return peak


def _local_bytes(t) -> int:
    from torch.distributed.tensor import DTensor

    t = t.to_local() if isinstance(t, DTensor) else t
    return t.numel() * t.element_size()


def _measure(cfg):
    """Train `cfg`; (this rank's last-step bytes and exposed seconds per axis and state bytes, the trainer's
    open runtime)."""
    from megagen.train.loop import Trainer

    trainer = Trainer(cfg)
    grad_peak = watch_gradient_peak(trainer.runtime)
    trainer.run()
    last = trainer.history[-1] if trainer.history else {}
    optim = trainer.optimizer.state.values()
    measured = {
        "comm": last.get("comm_bytes", {}),
        "exposed": last.get("comm_exposed_s", {}),
        "params": sum(_local_bytes(p) for p in trainer.model.parameters()),
        "grads": grad_peak["bytes"],
        "optimizer": sum(_local_bytes(v) for st in optim for v in st.values() if v.dim() > 0),
    }
    return measured, trainer.runtime


def _predict(cfg, world: int, cluster, device_type: str) -> tuple[str, dict]:
    """The plan's label and the planner's bytes and exposed seconds per axis and state bytes on rank 0,
    for the run as it ran on `device_type` (which decided `parallel.overlap=auto`)."""
    from megagen.parallel.planner.step_cost import step_cost
    from megagen.planning import plan_point_for_config, workload_for_config

    plan = plan_point_for_config(cfg, world, device_type)
    cost = step_cost(workload_for_config(cfg), plan, cluster)
    return plan.label(), {
        "comm": cost.bytes_by_axis(),
        "exposed": cost.exposed_by_axis,
        "chunks": cost.overlap_chunks,
        "params": cost.param_bytes,
        "grads": cost.grad_bytes,
        "optimizer": cost.optimizer_bytes,
    }


def cluster_for_run(name: str, device):
    """`--cluster` if given, else the preset of the device the run used (`cpu` on a CPU run)."""
    from megagen.metrics.peak import gpu_key
    from megagen.parallel.planner.cluster import load_cluster

    if not name:
        if device.type != "cuda":
            name = "cpu"
        else:
            import torch

            key = gpu_key(torch.cuda.get_device_name(device)) or "H100"
            name = key.split()[0].lower()
    return load_cluster(name)


STATE_KEYS = (("param_bytes", "params"), ("grad_peak_bytes", "grads"), ("optimizer_bytes", "optimizer"))


def _report(label: str, predicted: dict, measured: dict, cluster_name: str) -> dict:
    """Predicted beside measured for every axis and state kind, and whether all of them are equal."""
    pc, mc = predicted["comm"], measured["comm"]
    axes = sorted({*pc, *mc})
    report = {
        "plan": label,
        "bytes_per_axis": {a: {"predicted": pc.get(a, 0), "measured": mc.get(a, 0)} for a in axes},
    }
    for key, part in STATE_KEYS:
        report[key] = {"predicted": predicted[part], "measured": measured[part]}
    pairs = [*report["bytes_per_axis"].values(), *(report[key] for key, _ in STATE_KEYS)]
    report["match"] = all(v["predicted"] == v["measured"] for v in pairs)
    pe, me = predicted["exposed"], measured["exposed"]
    report["exposed_s_per_axis"] = {  # timing, so not part of `match`; None: the run cannot see the wait
        a: {"predicted": pe.get(a, 0.0), "measured": me.get(a, 0.0)} for a in sorted({*pe, *me})
    }
    report["cluster"], report["overlap_chunks"] = cluster_name, predicted["chunks"]
    return report


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def _print_table(report: dict) -> None:
    out = sys.stdout
    out.write(f"plan {report['plan']} (rank 0, one step)\n{'':18s}{'predicted':>14s}{'measured':>14s}\n")
    for axis, v in report["bytes_per_axis"].items():
        out.write(f"{axis + ' bytes':18s}{v['predicted']:14d}{v['measured']:14d}\n")
    for key, _ in STATE_KEYS:
        v = report[key]
        out.write(f"{key:18s}{v['predicted']:14d}{v['measured']:14d}\n")
    out.write("match: " + ("yes" if report["match"] else "NO") + "\n")
    chunks = ", ".join(f"{rule} {n}" for rule, n in report["overlap_chunks"].items()) or "none"
    out.write(f"exposed communication, s per step (predicted on {report['cluster']}; chunks: {chunks})\n")
    for axis, v in report["exposed_s_per_axis"].items():
        out.write(f"{axis + ' exposed':18s}{_seconds(v['predicted']):>14s}{_seconds(v['measured']):>14s}\n")


def validate_config(path: str, overrides: list[str], cluster_name: str, as_json: bool = False) -> int:
    """Run `path` for two steps and compare with the planner (predicted exposed time on `cluster_name`, or
    the run's device when empty); 0 when every byte and state count matches."""
    import torch.distributed as dist

    from megagen.config import load_config

    cfg = load_config(path, [*overrides, *VALIDATE_OVERRIDES])
    measured, runtime = _measure(cfg)
    world = dist.get_world_size() if dist.is_initialized() else 1
    cluster = cluster_for_run(cluster_name, runtime.device)
    report = _report(*_predict(cfg, world, cluster, runtime.device.type), measured, cluster.name)
    if not dist.is_initialized() or dist.get_rank() == 0:
        if as_json:
            sys.stdout.write(json.dumps(report) + "\n")
        else:
            _print_table(report)
    runtime.close()
    return 0 if report["match"] else 1
