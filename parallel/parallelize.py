"""Apply a spec's ParallelPlan to a model: TP/SP → CP → activation recompute → compile → FSDP.

The order matters: tensor parallelism swaps linears (their weights become tp DTensors) before FSDP wraps
blocks, so FSDP2 shards DTensors over the remaining (dp_shard×cp) axis; recompute and compile act on
block instances without renaming parameters. This module knows nothing of any model.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
from torch import nn

from megagen.parallel.context_parallel import ContextParallelAttention
from megagen.parallel.fsdp import apply_fsdp
from megagen.parallel.grad_reduction import DATA_AXES, engine_reductions
from megagen.parallel.mesh import Mesh
from megagen.parallel.overlap_schedule import overlap_on
from megagen.parallel.plan import ParallelPlan
from megagen.parallel.precision import autocast_forward
from megagen.parallel.recompute import apply_recompute
from megagen.parallel.sequence import SequenceSharder
from megagen.parallel.sharded_norm import apply_sharded_norms
from megagen.parallel.tensor_parallel import apply_tensor_parallel


@dataclass
class ParallelState:
    """What the runtime needs to know after parallelisation."""

    sharder: SequenceSharder
    engine_sums: dict[str, list[str]] = field(default_factory=dict)
    """Mesh axis → parameters whose partial gradients the runtime sums over it (`grad_reduction.py`)."""
    fsdp: bool = False
    grads_summed: bool = True
    """False when FSDP averages over data-parallel ranks (older torch): the loss is scaled to compensate."""


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def parallelize(
    model: nn.Module, plan: ParallelPlan, mesh: Mesh, parallel_cfg, recompute: str, recompute_layers: int = -1
) -> ParallelState:
    """Shard `model` in place over `mesh` as `plan` declares."""
    dims = mesh.dims
    sp = parallel_cfg.sequence_parallel and dims.tp > 1
    tp_rank = mesh.local_rank("tp") if dims.tp > 1 else 0
    cp_rank = mesh.local_rank("cp") if dims.cp > 1 else 0
    shards = dims.cp * (dims.tp if sp else 1)
    index = cp_rank * (dims.tp if sp else 1) + (tp_rank if sp else 0)
    sharder = SequenceSharder(shards, index, plan.sequence_inputs, plan.token_mask)
    state = ParallelState(sharder=sharder)
    fsdp = dims.fsdp * dims.dp_replicate > 1
    overlap = overlap_on(parallel_cfg.overlap, mesh.device_type)
    # FSDP's mesh (Mesh.fsdp_mesh) spans dp_replicate × dp_shard×cp and sums the gradients over all three
    state.engine_sums = engine_reductions(model, plan, dims.sizes(), sp, DATA_AXES if fsdp else ())

    if dims.tp > 1:
        apply_tensor_parallel(model, plan, mesh["tp"], sp, overlap)

    if dims.tp > 1 and plan.sharded_norms:
        apply_sharded_norms(model, plan, mesh["tp"])

    if shards > 1:
        cores = [
            n for n, _ in model.named_modules() if any(fnmatch.fnmatchcase(n, p) for p in plan.self_attention)
        ]
        if not cores:
            raise ValueError(
                "parallel plan declares no self-attention core, so the sequence cannot be sharded"
            )
        group = mesh.group("cp") if dims.cp > 1 else None
        for name in cores:
            _replace(
                model,
                name,
                ContextParallelAttention(model.get_submodule(name), parallel_cfg.cp_kind, group, overlap),
            )
        sharder.install(model)

    blocks = model.get_submodule(plan.blocks)
    apply_recompute(model, plan.blocks, recompute, layers=recompute_layers)
    if parallel_cfg.compile:
        for block in blocks:
            block.compile(backend=parallel_cfg.compile_backend)

    if fsdp:
        state.fsdp = True
        state.grads_summed = apply_fsdp(
            model,
            blocks,
            mesh.fsdp_mesh(),
            parallel_cfg.param_dtype,
            parallel_cfg.reduce_dtype,
            parallel_cfg.reshard_after_forward,
        )
    else:
        autocast_forward(model, parallel_cfg.param_dtype, torch.device(mesh.device_type))
    return state
