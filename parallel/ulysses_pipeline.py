"""Ulysses attention pipelined over head groups: communication of one group under attention of another.

Why: plain Ulysses waits for the whole q/k/v all-to-all before attending and for the whole output
all-to-all after. Attention is independent per head, so the heads can go in h groups: the all-to-all of
group i+1 is issued before group i attends, and group i's return all-to-all is issued right after, so
only the first group's input and the last group's output stay exposed. The result is bitwise that of one
stacked all-to-all (the same per-head math; only which heads travel together changes).

Each all-to-all is split into two autograd functions, an issue and a wait, so backward is pipelined too:
the autograd engine runs nodes in reverse creation order, so a group's gradient all-to-all is waited only
after the later group's backward, under which it travelled. Every wait goes through collectives._wait.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megagen.parallel.collectives import _F, _blocks_into, _chunks_first, _name, _wait
from megagen.parallel.comm import comm_axis
from megagen.parallel.mappings import all_to_all

AXIS = "cp"
SEQ_DIM, HEAD_DIM = 1, 2  # of (B, S, H, D); one more for the stacked (3, B, S, H, D) q/k/v


def _blocked_shape(shape: torch.Size, scatter_dim: int, n: int) -> tuple:
    """(n, *shape with `scatter_dim` divided by n): how the receive buffer of an all-to-all is laid out."""
    return (n, *shape[:scatter_dim], shape[scatter_dim] // n, *shape[scatter_dim + 1 :])


def _issue(x: torch.Tensor, scatter_dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Start the all-to-all that sends chunk j of `x` along `scatter_dim` to rank j; returns the raw
    receive buffer (block j from rank j), not yet waited."""
    n = dist.get_world_size(group)
    blocks = _chunks_first(x, scatter_dim, n).flatten(0, 1)
    rows = [blocks.shape[0] // n] * n
    with comm_axis(AXIS):
        return _F.all_to_all_single(blocks, rows, rows, _name(group))


def _land(raw: torch.Tensor, blocked_shape: tuple, gather_dim: int) -> torch.Tensor:
    """Wait for an issued all-to-all and join the received blocks along `gather_dim`."""
    with comm_axis(AXIS):
        done = _wait(raw)
    return _blocks_into(done.view(blocked_shape), gather_dim)


class _IssueAllToAll(torch.autograd.Function):
    """Forward: issue the all-to-all of x (not waited). Backward: land the reverse all-to-all that
    `_WaitAllToAll.backward` issued, back in x's layout."""

    @staticmethod
    def forward(ctx, x, scatter_dim, group):
        ctx.scatter_dim = scatter_dim
        ctx.blocked_shape = _blocked_shape(x.shape, scatter_dim, dist.get_world_size(group))
        return _issue(x, scatter_dim, group)

    @staticmethod
    def backward(ctx, grad_raw):
        return _land(grad_raw, ctx.blocked_shape, ctx.scatter_dim), None, None


class _WaitAllToAll(torch.autograd.Function):
    """Forward: wait for an issued all-to-all and lay it out. Backward: issue the reverse all-to-all of
    the gradient (not waited; `_IssueAllToAll.backward` waits for it)."""

    @staticmethod
    def forward(ctx, raw, blocked_shape, gather_dim, group):
        ctx.gather_dim, ctx.group = gather_dim, group
        return _land(raw, blocked_shape, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        return _issue(grad.contiguous(), ctx.gather_dim, ctx.group), None, None, None


def _issued(x: torch.Tensor, scatter_dim: int, group: dist.ProcessGroup):
    """(raw, blocked shape) of an all-to-all issued through autograd."""
    blocked = _blocked_shape(x.shape, scatter_dim, dist.get_world_size(group))
    return _IssueAllToAll.apply(x, scatter_dim, group), blocked


def pipelined_ulysses(inner, q, k, v, kv_valid, group: dist.ProcessGroup, chunks: int) -> torch.Tensor:
    """Ulysses around `inner` on (B, S_local, H, D) with q/k/v stacked and the heads in `chunks` groups;
    `chunks` must divide H / cp (overlap_schedule.ulysses_head_chunks picks it)."""
    qkv = torch.stack([q, k, v])
    if chunks == 1:  # one stacked all-to-all instead of three; pure data movement, so bitwise
        q, k, v = all_to_all(qkv, HEAD_DIM + 1, SEQ_DIM + 1, group, AXIS).unbind(0)
        return all_to_all(inner(q, k, v, kv_valid), SEQ_DIM, HEAD_DIM, group, AXIS)
    n = dist.get_world_size(group)
    if q.shape[HEAD_DIM] % (chunks * n):
        raise ValueError(f"ulysses head chunks {chunks}: {q.shape[HEAD_DIM]} heads do not split over cp {n}")
    groups = qkv.chunk(chunks, dim=HEAD_DIM + 1)
    incoming = _issued(groups[0], HEAD_DIM + 1, group)
    returning = []
    for i in range(chunks):
        following = _issued(groups[i + 1], HEAD_DIM + 1, group) if i + 1 < chunks else None
        q_i, k_i, v_i = _WaitAllToAll.apply(*incoming, SEQ_DIM + 1, group).unbind(0)
        returning.append(_issued(inner(q_i, k_i, v_i, kv_valid), SEQ_DIM, group))  # travels under i+1
        incoming = following
    return torch.cat([_WaitAllToAll.apply(*r, HEAD_DIM, group) for r in returning], dim=HEAD_DIM)
