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
    """Train `cfg`; (this rank's last-step bytes per axis and state bytes, the trainer's open runtime)."""
    from megagen.train.loop import Trainer

    trainer = Trainer(cfg)
    grad_peak = watch_gradient_peak(trainer.runtime)
    trainer.run()
    comm = trainer.history[-1].get("comm_bytes", {}) if trainer.history else {}
    optim = trainer.optimizer.state.values()
    measured = {
        "comm": comm,
        "params": sum(_local_bytes(p) for p in trainer.model.parameters()),
        "grads": grad_peak["bytes"],
        "optimizer": sum(_local_bytes(v) for st in optim for v in st.values() if v.dim() > 0),
    }
    return measured, trainer.runtime


def _predict(cfg, world: int) -> tuple[str, dict]:
    """The plan's label and the planner's bytes per axis and state bytes on rank 0."""
    from megagen.parallel.planner.comm_cost import communication
    from megagen.parallel.planner.memory import state_memory
    from megagen.planning import plan_point_for_config, workload_for_config

    work = workload_for_config(cfg)
    plan = plan_point_for_config(cfg, world)
    comm = {a: sum(v["bytes"] for v in kinds.values()) for a, kinds in communication(work, plan).items()}
    params, grads, optim = state_memory(work, plan)
    return plan.label(), {"comm": comm, "params": params, "grads": grads, "optimizer": optim}


STATE_KEYS = (("param_bytes", "params"), ("grad_peak_bytes", "grads"), ("optimizer_bytes", "optimizer"))


def _report(label: str, predicted: dict, measured: dict) -> dict:
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
    return report


def _print_table(report: dict) -> None:
    out = sys.stdout
    out.write(f"plan {report['plan']} (rank 0, one step)\n{'':16s}{'predicted':>14s}{'measured':>14s}\n")
    for axis, v in report["bytes_per_axis"].items():
        out.write(f"{axis + ' bytes':16s}{v['predicted']:14d}{v['measured']:14d}\n")
    for key, _ in STATE_KEYS:
        v = report[key]
        out.write(f"{key:16s}{v['predicted']:14d}{v['measured']:14d}\n")
    out.write("match: " + ("yes" if report["match"] else "NO") + "\n")


def validate_config(path: str, overrides: list[str], cluster_name: str, as_json: bool = False) -> int:
    """Run `path` for two steps and compare with the planner; 0 when every number matches."""
    import torch.distributed as dist

    from megagen.config import load_config

    cfg = load_config(path, [*overrides, *VALIDATE_OVERRIDES])
    measured, runtime = _measure(cfg)
    world = dist.get_world_size() if dist.is_initialized() else 1
    report = _report(*_predict(cfg, world), measured)
    if not dist.is_initialized() or dist.get_rank() == 0:
        if as_json:
            sys.stdout.write(json.dumps(report) + "\n")
        else:
            _print_table(report)
    runtime.close()
    return 0 if report["match"] else 1
