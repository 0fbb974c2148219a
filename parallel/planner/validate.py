"""`megagen plan --validate`: run a config for a few steps and set its measured traffic and memory beside
the planner's prediction (exact equality expected for bytes and parameter/gradient/optimizer memory)."""

from __future__ import annotations

import json
import sys


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


def validate_config(path: str, overrides: list[str], cluster_name: str, as_json: bool = False) -> int:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from megagen.config import load_config
    from megagen.parallel.planner.comm_cost import communication
    from megagen.parallel.planner.memory import state_memory
    from megagen.planning import plan_point_for_config, workload_for_config
    from megagen.train.loop import Trainer

    cfg = load_config(
        path,
        [
            *overrides,
            "train.steps=2",
            "metrics.comm=true",
            "metrics.jsonl=false",
            "metrics.tensorboard=false",
            "metrics.progress=none",
            "checkpoint.every=0",
        ],
    )
    trainer = Trainer(cfg)
    grad_peak = watch_gradient_peak(trainer.runtime)
    trainer.run()
    world = dist.get_world_size() if dist.is_initialized() else 1
    measured_comm = {}
    for r in trainer.history[-1:]:
        measured_comm = r.get("comm_bytes", {})

    def nbytes(t):
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    measured_params = sum(nbytes(p) for p in trainer.model.parameters())
    measured_optim = sum(
        nbytes(v) for st in trainer.optimizer.state.values() for v in st.values() if v.dim() > 0
    )
    work = workload_for_config(cfg)
    plan = plan_point_for_config(cfg, world)
    predicted = {a: sum(v["bytes"] for v in kinds.values()) for a, kinds in communication(work, plan).items()}
    params, grads, optim = state_memory(work, plan)
    report = {
        "plan": plan.label(),
        "bytes_per_axis": {
            a: {"predicted": predicted.get(a, 0), "measured": measured_comm.get(a, 0)}
            for a in sorted(set(predicted) | set(measured_comm))
        },
        "param_bytes": {"predicted": params, "measured": measured_params},
        "grad_peak_bytes": {"predicted": grads, "measured": grad_peak["bytes"]},
        "optimizer_bytes": {"predicted": optim, "measured": measured_optim},
    }
    ok = all(v["predicted"] == v["measured"] for v in report["bytes_per_axis"].values())
    ok = ok and params == measured_params and optim == measured_optim and grads == grad_peak["bytes"]
    report["match"] = ok
    if not dist.is_initialized() or dist.get_rank() == 0:
        if as_json:
            sys.stdout.write(json.dumps(report) + "\n")
        else:
            sys.stdout.write(
                f"plan {report['plan']} (rank 0, one step)\n{'':16s}{'predicted':>14s}{'measured':>14s}\n"
            )
            for axis, v in report["bytes_per_axis"].items():
                sys.stdout.write(f"{axis + ' bytes':16s}{v['predicted']:14d}{v['measured']:14d}\n")
            for key in ("param_bytes", "grad_peak_bytes", "optimizer_bytes"):
                v = report[key]
                sys.stdout.write(f"{key:16s}{v['predicted']:14d}{v['measured']:14d}\n")
            sys.stdout.write("match: " + ("yes" if ok else "NO") + "\n")
    trainer.runtime.close()
    return 0 if ok else 1
