"""Megatron-style tensor parallelism with optional sequence parallelism, applied from a plan.

Column-parallel linears keep their output features' shard, row-parallel ones their input features' shard;
weights become DTensors with their true placement on the tp mesh (FSDP2 and DCP see the global layout)
while compute runs on local shards. Where activations enter a region (`TPRegion`) a pre-hook gathers them
over tp (SP) or marks them for a backward all-reduce (no SP); row-parallel outputs are reduce-scattered
(SP) or all-reduced. Which parameters are left with tp-partial gradients (and summed by the runtime after
backward) is the gradient rule of `grad_reduction.py`.
"""

from __future__ import annotations

import fnmatch
import inspect

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from megagen.parallel.mappings import (
    copy_to_region,
    gather_along,
    reduce_from_region,
    reduce_scatter_along_dim,
)
from megagen.parallel.plan import ParallelPlan, TPRegion

SEQ_DIM = 1  # activations inside blocks are (batch, sequence, features)


def _local(p: torch.Tensor | None) -> torch.Tensor | None:
    return p.to_local() if isinstance(p, DTensor) else p


def _shard_param(p: torch.Tensor, mesh: DeviceMesh, dim: int) -> nn.Parameter:
    return nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(dim)], src_data_rank=None))


class ColumnParallelLinear(nn.Module):
    """y_local = x W_localᵀ: weight (and bias) split on output features over tp."""

    def __init__(self, linear: nn.Linear, mesh: DeviceMesh):
        super().__init__()
        tp = mesh.size()
        if linear.out_features % tp:
            raise ValueError(f"out_features {linear.out_features} not divisible by tp={tp}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = _shard_param(linear.weight, mesh, 0)
        self.bias = None if linear.bias is None else _shard_param(linear.bias, mesh, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, _local(self.weight), _local(self.bias))


class RowParallelLinear(nn.Module):
    """y = Σ_tp x_local W_localᵀ: weight split on input features; output reduced over tp.

    With sequence parallelism the sum is a reduce-scatter over the sequence dim, so the output leaves the
    region sharded; otherwise an all-reduce. The bias (replicated) is added once, after the reduction.
    """

    def __init__(self, linear: nn.Linear, mesh: DeviceMesh, sequence_parallel: bool):
        super().__init__()
        tp = mesh.size()
        if linear.in_features % tp:
            raise ValueError(f"in_features {linear.in_features} not divisible by tp={tp}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = _shard_param(linear.weight, mesh, 1)
        self.bias = linear.bias
        self.group = mesh.get_group()
        self.sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, _local(self.weight))
        if self.sequence_parallel:
            y = reduce_scatter_along_dim(y, SEQ_DIM, self.group)
        else:
            y = reduce_from_region(y, self.group)
        return y if self.bias is None else y + self.bias


def _matching(model: nn.Module, patterns) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _region_hook(region: TPRegion, arg_names: list[str], group: dist.ProcessGroup, sequence_parallel: bool):
    def enter(x: torch.Tensor, sequence: bool) -> torch.Tensor:
        if sequence and sequence_parallel:
            return gather_along(x, SEQ_DIM, group)
        if sequence or not sequence_parallel:
            return copy_to_region(x, group)
        return x  # replicated input under SP: its gradient stays partial like every replicated param's

    def hook(module, args, kwargs):
        args = list(args)
        for i, name in enumerate(arg_names[: len(args)]):
            if name in region.seq_args or name in region.replicated_args:
                if isinstance(args[i], torch.Tensor):
                    args[i] = enter(args[i], name in region.seq_args)
        for name in list(kwargs):
            if (name in region.seq_args or name in region.replicated_args) and isinstance(
                kwargs[name], torch.Tensor
            ):
                kwargs[name] = enter(kwargs[name], name in region.seq_args)
        return tuple(args), kwargs

    return hook


def apply_tensor_parallel(
    model: nn.Module, plan: ParallelPlan, mesh: DeviceMesh, sequence_parallel: bool
) -> None:
    """Shard the plan's linears over the tp mesh and install region-entry hooks (in place)."""
    col = _matching(model, plan.colwise)
    row = _matching(model, plan.rowwise)
    for pattern in (*plan.colwise, *plan.rowwise):
        if not _matching(model, [pattern]):
            raise ValueError(f"parallel plan pattern {pattern!r} matches no module")
    for name, module in col:
        if not isinstance(module, nn.Linear):
            raise TypeError(f"colwise {name} is {type(module).__name__}, expected nn.Linear")
        _replace(model, name, ColumnParallelLinear(module, mesh))
    for name, module in row:
        if not isinstance(module, nn.Linear):
            raise TypeError(f"rowwise {name} is {type(module).__name__}, expected nn.Linear")
        _replace(model, name, RowParallelLinear(module, mesh, sequence_parallel))
    group = mesh.get_group()
    for pattern, region in plan.regions.items():
        hits = _matching(model, [pattern])
        if not hits:
            raise ValueError(f"parallel plan region {pattern!r} matches no module")
        for _, module in hits:
            names = list(inspect.signature(module.forward).parameters)
            module.register_forward_pre_hook(
                _region_hook(region, names, group, sequence_parallel), with_kwargs=True
            )
