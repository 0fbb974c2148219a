"""A token-wise tensor-parallel region run as sequence pieces, so its SP collectives hide behind its GEMMs.

Why: under sequence parallelism a region waits for the all-gather of its whole input before any GEMM, and
its row-parallel output is reduce-scattered after the last one. A region whose output for a token depends
only on that token's input row (an MLP; cross-attention, whose context is replicated) can instead run on
c pieces: piece i is the i-th sub-slice of every rank's local shard. The all-gather of piece i+1 is in
flight while piece i computes, and the reduce-scatter of piece i's partial output while piece i+1
computes. The gathered piece is rank-major (rank 0's rows, then rank 1's, ...); token-wise-ness makes
that order harmless, and the reduce-scatter hands each rank exactly its own rows of the piece back.

Autograd: `_IssueGather` / `_IssueReduceScatter` return a collective's result before it is complete and
`_Wait` completes it (every wait goes through `collectives._wait`, so the accounting times it); their
backwards are each other's collective, waited at once (the backward is synchronous per piece).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from megagen.parallel.collectives import _F, _name, _wait
from megagen.parallel.comm import comm_axis

AXIS = "tp"
SEQ_DIM = 1  # activations inside blocks are (batch, sequence, features)


def _gather_rows(x: torch.Tensor, n: int, group) -> torch.Tensor:
    """Issue the all-gather of (B, p, ...) x: the pending result is (n·B, p, ...), block j from rank j."""
    with comm_axis(AXIS):
        return _F.all_gather_into_tensor(x.contiguous(), n, _name(group))


def _scatter_rows(x: torch.Tensor, n: int, group) -> torch.Tensor:
    """Issue the reduce-scatter of (n·B, p, ...) x: the pending result is this rank's summed (B, p, ...)."""
    with comm_axis(AXIS):
        return _F.reduce_scatter_tensor(x.contiguous(), "sum", n, _name(group))


def _wait_tp(t: torch.Tensor) -> torch.Tensor:
    with comm_axis(AXIS):
        return _wait(t)


def rank_major(gathered: torch.Tensor, n: int) -> torch.Tensor:
    """(n·B, p, ...) gather result → (B, n·p, ...): each rank's rows side by side along the sequence."""
    blocks = gathered.unflatten(0, (n, -1))  # (n, B, p, ...)
    return blocks.movedim(0, SEQ_DIM).flatten(SEQ_DIM, SEQ_DIM + 1).contiguous()


def rank_blocks(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n·p, ...) → (n·B, p, ...): the inverse of `rank_major`, the layout a reduce-scatter takes."""
    return x.unflatten(SEQ_DIM, (n, -1)).movedim(SEQ_DIM, 0).flatten(0, 1).contiguous()


class _IssueGather(torch.autograd.Function):
    """x (B, p, ...) → pending (n·B, p, ...); backward: reduce-scatter of the gradient, waited."""

    @staticmethod
    def forward(ctx, x, n, group):
        ctx.n, ctx.group = n, group
        return _gather_rows(x, n, group)

    @staticmethod
    def backward(ctx, grad):
        return _wait_tp(_scatter_rows(grad, ctx.n, ctx.group)), None, None


class _IssueReduceScatter(torch.autograd.Function):
    """partial (n·B, p, ...) → pending summed (B, p, ...); backward: all-gather of the gradient, waited."""

    @staticmethod
    def forward(ctx, x, n, group):
        ctx.n, ctx.group = n, group
        return _scatter_rows(x, n, group)

    @staticmethod
    def backward(ctx, grad):
        return _wait_tp(_gather_rows(grad, ctx.n, ctx.group)), None, None


class _Wait(torch.autograd.Function):
    """Completes a pending collective result; the gradient passes through."""

    @staticmethod
    def forward(ctx, pending):
        return _wait_tp(pending)

    @staticmethod
    def backward(ctx, grad):
        return grad


Body = Callable[[dict], torch.Tensor]
"""Runs the region on one gathered piece of each sequence input (by key) and returns its partial sum."""


def run_in_pieces(body: Body, inputs: dict, pieces: int, group: dist.ProcessGroup) -> torch.Tensor:
    """The region's summed, sequence-sharded output, computed piece by piece with the gather of the next
    piece and the reduce-scatter of the previous one in flight (module docstring)."""
    n = dist.get_world_size(group)
    slices = {key: x.chunk(pieces, dim=SEQ_DIM) for key, x in inputs.items()}

    def issue(i: int) -> dict:
        return {key: _IssueGather.apply(s[i], n, group) for key, s in slices.items()}

    arriving, leaving, outs = issue(0), None, []
    for i in range(pieces):
        current = arriving
        if i + 1 < pieces:
            arriving = issue(i + 1)  # in flight while piece i computes
        partial = body({key: rank_major(_Wait.apply(t), n) for key, t in current.items()})
        if leaving is not None:
            outs.append(_Wait.apply(leaving))
        leaving = _IssueReduceScatter.apply(rank_blocks(partial, n), n, group)  # under piece i+1
    outs.append(_Wait.apply(leaving))
    return torch.cat(outs, dim=SEQ_DIM)
