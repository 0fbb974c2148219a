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

from megagen.parallel.context_parallel import ContextParallelAttention, SequenceLayout
from megagen.parallel.fsdp import apply_fsdp
from megagen.parallel.mesh import Mesh
from megagen.parallel.plan import ParallelPlan
from megagen.parallel.precision import autocast_forward
from megagen.parallel.recompute import apply_recompute
from megagen.parallel.sequence import SequenceSharder
from megagen.parallel.tensor_parallel import apply_tensor_parallel, replicated_params


@dataclass
class ParallelState:
    """What the runtime needs to know after parallelisation."""

    sharder: SequenceSharder
    tp_partial_grads: list[str] = field(default_factory=list)
    """Names of parameters whose gradients are partial over tp (replicated params under SP)."""
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
    layout = SequenceLayout()
    sharder = SequenceSharder(shards, cp_rank * (dims.tp if sp else 1) + (tp_rank if sp else 0), layout)
    state = ParallelState(sharder=sharder)

    if dims.tp > 1:
        apply_tensor_parallel(model, plan, mesh["tp"], sp)
        if sp:
            ids = {id(p) for p in replicated_params(model)}
            state.tp_partial_grads = [n for n, p in model.named_parameters() if id(p) in ids]

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
                ContextParallelAttention(model.get_submodule(name), parallel_cfg.cp_kind, group, layout),
            )
        sharder.install(model, plan.sequence_inputs)

    blocks = model.get_submodule(plan.blocks)
    apply_recompute(model, plan.blocks, recompute, layers=recompute_layers)
    if parallel_cfg.compile:
        for block in blocks:
            block.compile(backend=parallel_cfg.compile_backend)

    if dims.fsdp * dims.dp_replicate > 1:
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
