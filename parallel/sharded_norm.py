"""RMSNorm over a tensor-parallel-sharded dimension, applied from `ParallelPlan.sharded_norms`.

Some models normalise a projection's whole output width (Wan's RMSNorm on q and k across all heads).
Under tp each rank holds only its columns of that width, so its local mean of squares is the wrong
statistic. The norm's module becomes a `TensorParallelSharded<Norm>` (a class swap: parameter names stay):
each rank sums the squares of its columns, the partial sums are all-reduced over tp, and the rank
normalises its columns by the global mean. Its weight is sharded on dim 0 over tp like the colwise
output it scales, so its gradient is complete on each shard (class SHARDED in `grad_reduction.py`).

Backward: every rank's output depends on the global sum, so the gradient of that sum is the sum over
ranks of each rank's gradient — an all-reduce as well (not the identity of `reduce_from_region`).
"""

from __future__ import annotations

import fnmatch

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from megagen.parallel.class_swap import swap_in
from megagen.parallel.collectives import all_reduce_sum, group_size
from megagen.parallel.comm import comm_axis
from megagen.parallel.plan import ParallelPlan


class _SumOverRanks(torch.autograd.Function):
    """Forward all-reduce, backward all-reduce: a statistic every rank's output depends on."""

    @staticmethod
    def forward(ctx, x, group, axis):
        ctx.group, ctx.axis = group, axis
        with comm_axis(axis):
            return all_reduce_sum(x, group)

    @staticmethod
    def backward(ctx, grad):
        with comm_axis(ctx.axis):
            return all_reduce_sum(grad.contiguous(), ctx.group), None, None


def sum_over_ranks(x: torch.Tensor, group: dist.ProcessGroup, axis: str = "tp") -> torch.Tensor:
    """Σ over the group's ranks of `x`, with the matching backward (identity for a group of one)."""
    return x if group_size(group) == 1 else _SumOverRanks.apply(x, group, axis)


def sharded_rms_norm(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, group: dist.ProcessGroup, full_dim: int
) -> torch.Tensor:
    """RMSNorm of the last dim, of which this rank holds a slice (x (..., full_dim / tp)), in fp32 like
    `kernels.rms_norm_reference`; `weight` is this rank's slice of the norm's weight."""
    x32 = x.float()
    squares = sum_over_ranks(x32.pow(2).sum(-1, keepdim=True), group)
    y = x32 * torch.rsqrt(squares / full_dim + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


class TensorParallelShardedNorm:
    """Norm wrapper (swapped in as a subclass, `class_swap.py`): RMSNorm whose normalised dim is split
    over tp; needs the norm's `eps` and (optional) `weight`."""

    prefix = "TensorParallelSharded"
    norm_group: dist.ProcessGroup
    norm_tp: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to_local() if isinstance(self.weight, DTensor) else self.weight
        return sharded_rms_norm(x, weight, self.eps, self.norm_group, x.shape[-1] * self.norm_tp)

    def extra_repr(self) -> str:
        inner = super().extra_repr()
        return f"sum_of_squares=all_reduce(tp={self.norm_tp})" + (f", {inner}" if inner else "")


def sharded_norm_modules(model: nn.Module, plan: ParallelPlan) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs the plan's `sharded_norms` patterns match."""
    return [
        (n, m) for n, m in model.named_modules() if any(fnmatch.fnmatchcase(n, p) for p in plan.sharded_norms)
    ]


def apply_sharded_norms(model: nn.Module, plan: ParallelPlan, mesh: DeviceMesh) -> None:
    """Make every norm the plan declares sharded a `TensorParallelSharded<Norm>`, its weight a tp DTensor
    split on dim 0, in place."""
    for pattern in plan.sharded_norms:
        if not any(fnmatch.fnmatchcase(n, pattern) for n, _ in model.named_modules()):
            raise ValueError(f"parallel plan sharded norm {pattern!r} matches no module")
    tp = mesh.size()
    for _, module in sharded_norm_modules(model, plan):
        weight = getattr(module, "weight", None)
        if weight is not None:
            if weight.shape[0] % tp:
                raise ValueError(f"norm width {weight.shape[0]} not divisible by tp={tp}")
            module.weight = nn.Parameter(
                distribute_tensor(weight.detach(), mesh, [Shard(0)], src_data_rank=None)
            )
        swap_in(module, TensorParallelShardedNorm)
        module.norm_group, module.norm_tp = mesh.get_group(), tp
