"""The bridge between a training config and the (model-agnostic) planner in megagen.parallel.planner."""

from __future__ import annotations

import torch

from megagen.config import Config
from megagen.parallel.mesh import ParallelDims
from megagen.parallel.planner.cost import PlanPoint
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
    return trace_workload(model, spec.parallel_plan(cfg), inputs, batch)


def plan_point_for_config(cfg: Config, world_size: int, global_batch: int | None = None) -> PlanPoint:
    """The PlanPoint a config would run as on `world_size` ranks."""
    p = cfg.parallel
    dims = ParallelDims.resolve(p.dp_replicate, p.dp_shard, p.cp, p.tp, world_size)
    g = global_batch or cfg.train.global_batch_size
    mb = cfg.train.micro_batch_size
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
    )
