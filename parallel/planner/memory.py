"""Parameter, gradient and optimizer bytes per rank, from FSDP2's sharding of each tp-local parameter.

FSDP2 pads each parameter's dim 0 to a multiple of the shard-group size and gives shard i rows
[i·c, (i+1)·c); rank 0 holds the largest shard. The numbers equal what the engine holds
(`tests/distributed/test_planner_exact.py`).
"""

from __future__ import annotations

import math

from megagen.parallel.planner.plan_point import DTYPE_BYTES, PlanPoint, uses_fsdp
from megagen.parallel.planner.workload import ParamShape, Workload, cached


def local_shape(p: ParamShape, tp: int) -> tuple[int, ...]:
    """The parameter's shape on one tp rank."""
    if p.tp_dim is None or tp == 1:
        return p.shape
    shape = list(p.shape)
    shape[p.tp_dim] //= tp
    return tuple(shape)


def _rest(shape: tuple[int, ...]) -> int:
    return math.prod(shape[1:]) if len(shape) > 1 else 1


def fsdp_padded_numel(params: list[ParamShape], tp: int, n: int) -> int:
    """FSDP2 pads each parameter's dim 0 to a multiple of the shard-group size."""
    total = 0
    for p in params:
        s = local_shape(p, tp)
        rows = s[0] if s else 1
        total += -(-rows // n) * n * _rest(s)
    return total


def rank0_numel(params: list[ParamShape], tp: int, n: int, index: int = 0) -> int:
    """Elements FSDP shard `index` of n holds (rank 0 by default, the largest): FSDP2 gives shard i rows
    [i·c, (i+1)·c) of each tp-local parameter's dim 0, c = ceil(dim0/n), the last shards fewer or none."""
    total = 0
    for p in params:
        s = local_shape(p, tp)
        rows = s[0] if s else 1
        chunk = -(-rows // n)
        total += max(0, min(chunk, rows - index * chunk)) * _rest(s)
    return total


def unit_padded_numels(work: Workload, tp: int, n: int) -> list[int]:
    """FSDP-padded elements of each unit (blocks, then the root) at (tp, shard size n)."""
    units = [*work.block_params, work.root_params]
    return cached(work, ("padded", tp, n), lambda: [fsdp_padded_numel(u, tp, n) for u in units])


def state_memory(work: Workload, plan: PlanPoint, shard: int = 0) -> tuple[int, int, int]:
    """(param, grad, optimizer) bytes on rank 0 (or on the ranks of FSDP shard index `shard`): fp32 master
    params, the most gradient bytes held during a step (`gradient_bytes`), AdamW's two moments."""
    params = [p for blk in work.block_params for p in blk] + work.root_params
    n = plan.fsdp if uses_fsdp(plan) else 1
    numel = cached(work, ("state", plan.tp, n, shard), lambda: rank0_numel(params, plan.tp, n, shard))
    return numel * 4, gradient_bytes(work, plan, shard), 2 * numel * 4


def gradient_bytes(work: Workload, plan: PlanPoint, shard: int = 0) -> int:
    """The most gradient bytes rank 0 holds at once in a step (numel × element size of its tensors).

    Sharded fp32 gradients (rank 0's FSDP shard) when every micro-batch reduces. Under no-sync
    (`holds_unsharded_grads`) each unit keeps its whole tp-local gradient in the reduce dtype until the last
    micro-batch's backward reduces it; units are reduced in backward order (last block first, the root last)
    and each leaves its fp32 shard behind, so the peak is the largest total along that order.
    """
    n = plan.fsdp if uses_fsdp(plan) else 1
    units = [*work.block_params, work.root_params]
    sharded = cached(
        work, ("shard_units", plan.tp, n, shard), lambda: [rank0_numel(u, plan.tp, n, shard) for u in units]
    )
    if not plan.holds_unsharded_grads:
        return 4 * sum(sharded)
    full = cached(
        work,
        ("full_units", plan.tp),
        lambda: [sum(math.prod(local_shape(p, plan.tp)) for p in u) for u in units],
    )
    rb = DTYPE_BYTES[plan.reduce_dtype]
    held = rb * sum(full)
    peak = held
    for i in reversed(range(len(units) - 1)):  # blocks, last first
        held += 4 * sharded[i] - rb * full[i]
        peak = max(peak, held)
    return max(peak, held + 4 * sharded[-1] - rb * full[-1])


def fsdp_buffer_bytes(work: Workload, plan: PlanPoint) -> float:
    """FSDP's communication buffers at their peak: the largest block unit's all-gather output (every
    parameter's dim 0 padded to the shard group) twice, current and prefetched, in the compute dtype, and
    once in the reduce dtype (the unsharded gradient its reduce-scatter sends)."""
    unit = max(unit_padded_numels(work, plan.tp, plan.fsdp)[:-1], default=0)  # blocks; the root is last
    return unit * (2 * DTYPE_BYTES[plan.param_dtype] + DTYPE_BYTES[plan.reduce_dtype])
