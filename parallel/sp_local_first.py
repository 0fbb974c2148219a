"""Local-first column-parallel GEMMs for a region that is not token-wise (self-attention) under SP + overlap.

Why: such a region needs the whole gathered sequence, so it cannot run in pieces (`sp_pipeline.py`), but
its column-parallel GEMMs on the input (q, k, v) are row-wise: the rows this rank already holds can be
multiplied while the other ranks' rows are still being gathered. The wrapper issues the all-gather,
runs every column-parallel linear of the region on the local rows, waits, runs them on the remote rows,
and joins each output in rank order. The region body then runs on the gathered input as always (its
shapes are whole); a linear called with exactly that gathered tensor returns its joined output instead
of computing it again (`ColumnParallelLinear.precomputed`).

Backward mirrors it: the gathered input's gradient is reduce-scattered while the local rows' GEMM
backward runs, and waited after (`sp_pipeline`'s issue / wait pair).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn

from megagen.parallel.sp_pipeline import (
    SEQ_DIM,
    Slot,
    issue_gather,
    wait_gather,
    wait_in_backward,
)

log = logging.getLogger(__name__)


def _without_block(x: torch.Tensor, rank: int, rows: int) -> torch.Tensor:
    """x (B, n·rows, ...) without this rank's block of rows."""
    return torch.cat(
        [
            x.narrow(SEQ_DIM, 0, rank * rows),
            x.narrow(SEQ_DIM, (rank + 1) * rows, x.shape[SEQ_DIM] - (rank + 1) * rows),
        ],
        dim=SEQ_DIM,
    )


def _with_block(others: torch.Tensor, mine: torch.Tensor, rank: int) -> torch.Tensor:
    """The inverse of `_without_block`: this rank's rows put back at their place."""
    cut = rank * mine.shape[SEQ_DIM]
    rest = others.shape[SEQ_DIM] - cut
    return torch.cat([others.narrow(SEQ_DIM, 0, cut), mine, others.narrow(SEQ_DIM, cut, rest)], dim=SEQ_DIM)


def gather_local_first(x: torch.Tensor, linears: list[nn.Module], group: dist.ProcessGroup) -> torch.Tensor:
    """The all-gathered x (B, n·S, ...) with each of `linears` holding its output on it, computed on the
    local rows under the gather and on the remote rows after it."""
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    slot = Slot()
    pending = issue_gather(wait_in_backward(x), n, group, slot)
    mine = [linear(x) for linear in linears]  # under the gather
    gathered = wait_gather(pending, n, group, slot)
    remote = _without_block(gathered, rank, x.shape[SEQ_DIM])
    for linear, local_out in zip(linears, mine):
        linear.precomputed = (gathered, _with_block(linear(remote), local_out, rank))
    return gathered


def release(linears: list[nn.Module], region: str) -> None:
    """Drop the joined outputs after the region ran; say once if one went unused (wasted GEMMs)."""
    for linear in linears:
        if linear.precomputed is not None and not getattr(linear, "_unused_logged", False):
            log.warning("local-first: a column-parallel linear of %s does not read the region input", region)
            linear._unused_logged = True
        linear.precomputed = None
