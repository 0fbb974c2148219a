"""The bridge between a training config and the (model-agnostic) planner in megagen.parallel.planner."""

from __future__ import annotations

import torch

from megagen.config import Config
from megagen.parallel.mesh import ParallelDims
from megagen.parallel.overlap_schedule import overlap_on
from megagen.parallel.planner.activations import trace_saved
from megagen.parallel.planner.plan_point import PlanPoint
from megagen.parallel.planner.workload import Workload, trace_workload
from megagen.specs import get_spec


def workload_for_config(cfg: Config, latent_shape: tuple[int, ...] | None = None, batch: int = 1) -> Workload:
    """Trace the config's model on the meta device for one sample shape (default: the config's)."""
    spec = get_spec(cfg.model.spec)
    shapes = dict(spec.sample_shapes(cfg))
    if latent_shape is not None:
        shapes["latents"] = tuple(latent_shape)
    with torch.device("meta"):
        model = spec.build(cfg)
        fake = {k: torch.empty(batch, *s) for k, s in shapes.items()}
        inputs = spec.model_inputs(fake, fake["latents"], torch.empty(batch), None)
    plan = spec.parallel_plan(cfg)
    work = trace_workload(model, plan, inputs, batch)
    if batch == 1:
        work.saved = trace_saved(model, plan, inputs, work.tokens, cfg.parallel.param_dtype)
    return work


def plan_point_for_config(
    cfg: Config,
    world_size: int,
    device_type: str,
    global_batch: int | None = None,
    micro_batch: int | None = None,
) -> PlanPoint:
    """The PlanPoint a config would run as on `world_size` ranks of `device_type` ("cuda", "cpu": it
    decides `parallel.overlap=auto`); micro-batch `auto`: the largest that divides the batch, as memory
    permitting it would be."""
    p = cfg.parallel
    dims = ParallelDims.resolve(p.dp_replicate, p.dp_shard, p.cp, p.tp, world_size)
    g = global_batch or cfg.train.global_batch_size
    mb = micro_batch or cfg.train.micro_batch_size
    if mb == "auto":
        mb = max(1, g // dims.dp)
    return PlanPoint(
        dp_replicate=dims.dp_replicate,
        dp_shard=dims.dp_shard,
        cp=dims.cp,
        tp=dims.tp,
        cp_kind=p.cp_kind,
        sequence_parallel=p.sequence_parallel,
        micro_batch=mb,
        accumulation=g // (mb * dims.dp),
        recompute=cfg.train.recompute,
        recompute_layers=getattr(cfg.train, "recompute_layers", -1),
        param_dtype=p.param_dtype,
        reduce_dtype=p.reduce_dtype,
        reshard_after_forward=p.reshard_after_forward,
        grad_sync=p.grad_sync,
        overlap=overlap_on(p.overlap, device_type),
    )


def plan_overrides(plan: PlanPoint, global_batch: int) -> dict[str, object]:
    """The config keys that make a config run as `plan` (the inverse of `plan_point_for_config`): the mesh,
    CP kind, schedule, recompute, FSDP dtypes and resharding, gradient sync and the global batch."""
    return {
        "parallel.dp_replicate": plan.dp_replicate,
        "parallel.dp_shard": plan.dp_shard,
        "parallel.cp": plan.cp,
        "parallel.tp": plan.tp,
        "parallel.cp_kind": plan.cp_kind,
        "parallel.sequence_parallel": plan.sequence_parallel,
        "parallel.param_dtype": plan.param_dtype,
        "parallel.reduce_dtype": plan.reduce_dtype,
        "parallel.reshard_after_forward": plan.reshard_after_forward,
        "parallel.grad_sync": plan.grad_sync,
        "parallel.overlap": plan.overlap,
        "train.global_batch_size": global_batch,
        "train.micro_batch_size": plan.micro_batch,
        "train.recompute": plan.recompute,
        "train.recompute_layers": plan.recompute_layers,
    }


def override_line(keys: dict[str, object]) -> str:
    """`key=value …` as `megagen train CONFIG` takes them on its command line."""
    text = {True: "true", False: "false"}
    return " ".join(f"{k}={text[v] if isinstance(v, bool) else v}" for k, v in keys.items())


def memory_for_rank(device: torch.device) -> float:
    """Bytes this rank may use: the GPU's memory, or its share of the host's available memory on CPU."""
    import os

    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    available = None
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return available / max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def activation_fit(cfg: Config, latent_shape: tuple[int, ...], world_size: int, device: torch.device):
    """`fits(n, share)`: do n samples of `latent_shape` fit in `share` of this rank's memory left after
    parameters, gradients and optimizer state, by the planner's model? None when the spec cannot be traced."""
    from megagen.parallel.planner.cost import activation_bytes
    from megagen.parallel.planner.memory import state_memory

    try:
        work = workload_for_config(cfg, latent_shape)
    except Exception as exc:  # noqa: BLE001 - a spec the tracer cannot follow just gets no memory bound
        import logging

        logging.getLogger("megagen").info("micro-batch: no memory model for this spec (%s)", exc)
        return None
    plan = plan_point_for_config(cfg, world_size, device.type, micro_batch=1)
    per_sample, _ = activation_bytes(work, plan)
    left = memory_for_rank(device) - sum(state_memory(work, plan))
    return lambda n, share: n * per_sample <= share * left
