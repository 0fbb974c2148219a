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
backwards are each other's collective. Backward overlaps too, relying on autograd running later-created
nodes first: `_JoinPieces` issues every piece's output-gradient all-gather as soon as the gradient arrives
(each piece's `_IssueReduceScatter` backward waits its own); `_WaitGather`'s backward issues a piece's
input-gradient reduce-scatter as soon as that piece's backward is done, and it stays in flight until
`_WaitInBackward`, created before the pipeline, runs after all the pieces' backward. A collective handed
between two nodes travels in a `Slot`. Where the order differs, a wait only comes earlier; the results
are the same.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from megagen.parallel.collectives import _F, _name, _wait, issue_all_gather
from megagen.parallel.comm import comm_axis

AXIS = "tp"
SEQ_DIM = 1  # activations inside blocks are (batch, sequence, features)


def _gather_rows(x: torch.Tensor, n: int, group) -> torch.Tensor:
    """Issue the all-gather of (B, p, ...) x: the pending result is (n·B, p, ...), block j from rank j."""
    with comm_axis(AXIS):
        return issue_all_gather(x, n, group)


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


class Slot:
    """A collective one backward node issues early for another to wait on."""

    pending: torch.Tensor | None = None


class _IssueGather(torch.autograd.Function):
    """x (B, p, ...) → pending (n·B, p, ...); backward: hands on, un-waited, the gradient's reduce-scatter
    that `_WaitGather` issued into `slot` (`_WaitInBackward` completes it after the other pieces)."""

    @staticmethod
    def forward(ctx, x, n, group, slot):
        ctx.n, ctx.group, ctx.slot = n, group, slot
        return _gather_rows(x, n, group)

    @staticmethod
    def backward(ctx, grad):
        pending, ctx.slot.pending = ctx.slot.pending, None
        if pending is None:
            pending = _scatter_rows(grad, ctx.n, ctx.group)
        return pending, None, None, None


class _WaitGather(torch.autograd.Function):
    """Completes a pending all-gather; backward issues the gradient's reduce-scatter into `slot` at once:
    this node runs as soon as its piece's backward is done, `_IssueGather`'s only after earlier pieces."""

    @staticmethod
    def forward(ctx, pending, n, group, slot):
        ctx.n, ctx.group, ctx.slot = n, group, slot
        return _wait_tp(pending)

    @staticmethod
    def backward(ctx, grad):
        ctx.slot.pending = _scatter_rows(grad, ctx.n, ctx.group)
        return grad, None, None, None


class _WaitInBackward(torch.autograd.Function):
    """Identity forward; backward waits the gradient's pending collective. Applied to every piece before
    the pipeline starts, so autograd (which runs later-created nodes first) reaches it last."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _wait_tp(grad)


class _IssueReduceScatter(torch.autograd.Function):
    """partial (n·B, p, ...) → pending summed (B, p, ...); backward: the all-gather of the gradient that
    `_JoinPieces` issued into `slot` (issued here if it did not), waited."""

    @staticmethod
    def forward(ctx, x, n, group, slot):
        ctx.n, ctx.group, ctx.slot = n, group, slot
        return _scatter_rows(x, n, group)

    @staticmethod
    def backward(ctx, grad):
        pending, ctx.slot.pending = ctx.slot.pending, None
        if pending is None:
            pending = _gather_rows(grad, ctx.n, ctx.group)
        return _wait_tp(pending), None, None, None


class _Wait(torch.autograd.Function):
    """Completes a pending collective result; the gradient passes through."""

    @staticmethod
    def forward(ctx, pending):
        return _wait_tp(pending)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _JoinPieces(torch.autograd.Function):
    """Concatenates the output pieces; backward issues every piece's gradient all-gather at once, last
    piece first (the order backward needs them), so each hides behind the later pieces' backward."""

    @staticmethod
    def forward(ctx, n, group, slots, *pieces):
        ctx.n, ctx.group, ctx.slots = n, group, slots
        ctx.sizes = [p.shape[SEQ_DIM] for p in pieces]
        return torch.cat(pieces, dim=SEQ_DIM)

    @staticmethod
    def backward(ctx, grad):
        grads = grad.split(ctx.sizes, dim=SEQ_DIM)
        for slot, g in reversed(list(zip(ctx.slots, grads))):
            slot.pending = _gather_rows(g, ctx.n, ctx.group)
        return (None, None, None, *grads)


def issue_gather(x: torch.Tensor, n: int, group, slot: Slot) -> torch.Tensor:
    """Issue the all-gather of x (B, p, ...); `wait_gather` with the same `slot` completes it."""
    return _IssueGather.apply(x, n, group, slot)


def wait_gather(pending: torch.Tensor, n: int, group, slot: Slot) -> torch.Tensor:
    """The issued all-gather, completed and rank-major: (B, n·p, ...)."""
    return rank_major(_WaitGather.apply(pending, n, group, slot), n)


def wait_in_backward(x: torch.Tensor) -> torch.Tensor:
    """x itself; in backward, its gradient's pending reduce-scatter is waited here."""
    return _WaitInBackward.apply(x)


Body = Callable[[dict], torch.Tensor]
"""Runs the region on one gathered piece of each sequence input (by key) and returns its partial sum."""


def run_in_pieces(body: Body, inputs: dict, pieces: int, group: dist.ProcessGroup) -> torch.Tensor:
    """The region's summed, sequence-sharded output, computed piece by piece with the gather of the next
    piece and the reduce-scatter of the previous one in flight (module docstring)."""
    n = dist.get_world_size(group)
    slices = {key: [wait_in_backward(s) for s in x.chunk(pieces, dim=SEQ_DIM)] for key, x in inputs.items()}
    slots = [Slot() for _ in range(pieces)]  # output-gradient all-gathers
    entering = {key: [Slot() for _ in range(pieces)] for key in inputs}  # input-gradient reduce-scatters

    def issue(i: int) -> dict:
        return {key: issue_gather(s[i], n, group, entering[key][i]) for key, s in slices.items()}

    def arrived(i: int, pending: dict) -> dict:
        return {key: wait_gather(t, n, group, entering[key][i]) for key, t in pending.items()}

    arriving, leaving, outs = issue(0), None, []
    for i in range(pieces):
        current = arriving
        if i + 1 < pieces:
            arriving = issue(i + 1)  # in flight while piece i computes
        partial = body(arrived(i, current))
        if leaving is not None:
            outs.append(_Wait.apply(leaving))
        leaving = _IssueReduceScatter.apply(rank_blocks(partial, n), n, group, slots[i])  # under piece i+1
    outs.append(_Wait.apply(leaving))
    return _JoinPieces.apply(n, group, slots, *outs)
