"""Communication as autograd functions: each name says its forward and its backward.

Megatron's pairs, written for torch.distributed: a forward all-gather is a backward reduce-scatter, a
forward all-reduce is a backward identity and vice versa. (`torch.distributed.nn.functional.all_reduce`
all-reduces again in backward, which multiplies gradients by the group size — hence our own.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megagen.parallel.collectives import (
    all_gather_along,
    all_reduce_sum,
    all_to_all_along,
    group_size,
    reduce_scatter_along,
)
from megagen.parallel.comm import comm_axis


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, axis):
        ctx.group, ctx.axis = group, axis
        return x

    @staticmethod
    def backward(ctx, grad):
        with comm_axis(ctx.axis):
            return all_reduce_sum(grad, ctx.group), None, None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, axis):
        with comm_axis(axis):
            return all_reduce_sum(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class _GatherAlong(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group, axis):
        ctx.dim, ctx.group, ctx.axis = dim, group, axis
        with comm_axis(axis):
            return all_gather_along(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        with comm_axis(ctx.axis):
            return reduce_scatter_along(grad.contiguous(), ctx.dim, ctx.group), None, None, None


class _ReduceScatterAlong(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group, axis):
        ctx.dim, ctx.group, ctx.axis = dim, group, axis
        with comm_axis(axis):
            return reduce_scatter_along(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        with comm_axis(ctx.axis):
            return all_gather_along(grad.contiguous(), ctx.dim, ctx.group), None, None, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group, axis):
        ctx.dims, ctx.group, ctx.axis = (scatter_dim, gather_dim), group, axis
        with comm_axis(axis):
            return all_to_all_along(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        with comm_axis(ctx.axis):
            out = all_to_all_along(grad.contiguous(), gather_dim, scatter_dim, ctx.group)
        return out, None, None, None, None


# `axis` names the mesh axis for communication accounting (parallel/comm.py), in forward and backward.


def copy_to_region(x: torch.Tensor, group: dist.ProcessGroup, axis: str = "tp") -> torch.Tensor:
    """Forward identity, backward all-reduce: a replicated input entering a tensor-parallel region."""
    return x if group_size(group) == 1 else _CopyToRegion.apply(x, group, axis)


def reduce_from_region(x: torch.Tensor, group: dist.ProcessGroup, axis: str = "tp") -> torch.Tensor:
    """Forward all-reduce, backward identity: summing a row-parallel layer's partial outputs."""
    return x if group_size(group) == 1 else _ReduceFromRegion.apply(x, group, axis)


def gather_along(x: torch.Tensor, dim: int, group: dist.ProcessGroup, axis: str = "tp") -> torch.Tensor:
    """Forward all-gather along `dim`, backward reduce-scatter: sequence-sharded → full (SP, CP's K/V)."""
    return x if group_size(group) == 1 else _GatherAlong.apply(x, dim, group, axis)


def reduce_scatter_along_dim(
    x: torch.Tensor, dim: int, group: dist.ProcessGroup, axis: str = "tp"
) -> torch.Tensor:
    """Forward reduce-scatter along `dim`, backward all-gather: partial full → summed shard (SP out)."""
    return x if group_size(group) == 1 else _ReduceScatterAlong.apply(x, dim, group, axis)


def all_to_all(
    x: torch.Tensor, scatter_dim: int, gather_dim: int, group: dist.ProcessGroup, axis: str = "cp"
) -> torch.Tensor:
    """Forward all-to-all (split `scatter_dim`, join `gather_dim`), backward the reverse: Ulysses."""
    return x if group_size(group) == 1 else _AllToAll.apply(x, scatter_dim, gather_dim, group, axis)
