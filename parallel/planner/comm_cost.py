"""Bytes and calls of every collective per mesh axis for one optimizer step, and their time on a cluster.

Byte counts follow the engine exactly (parallel/tensor_parallel.py, context_parallel.py, fsdp.py,
runtime.py) with the accounting convention of parallel/comm.py: all-gather = output bytes, reduce-scatter
and all-to-all = input bytes, all-reduce = tensor bytes; all for rank 0 (FSDP gives rank 0 the largest
shard of an uneven parameter). Time uses a ring model per collective and the cluster's link figures.
"""

from __future__ import annotations

from megagen.parallel.grad_reduction import BETWEEN, SHARDED, partial_over_tp
from megagen.parallel.planner.cluster import Cluster
from megagen.parallel.planner.comm_table import CommTable
from megagen.parallel.planner.cost import _activation_collectives
from megagen.parallel.planner.memory import rank0_numel, unit_padded_numels
from megagen.parallel.planner.plan_point import DTYPE_BYTES, PlanPoint, uses_fsdp
from megagen.parallel.planner.workload import ParamShape, Workload, cached


def tp_partial_rank0_numel(work: Workload, tp: int, n: int, sp: bool, blocks_only: bool = False) -> int:
    """Elements of rank 0's gradients that are partial over tp (the gradient rule of grad_reduction.py);
    `blocks_only`: of the blocks' parameters alone (the root unit's left out)."""

    def partial(p: ParamShape) -> bool:
        cls = p.grad_class or (SHARDED if p.tp_dim is not None else BETWEEN)
        return partial_over_tp(cls, sp)

    def compute():
        params = [p for blk in work.block_params for p in blk if partial(p)]
        if not blocks_only:
            params += [p for p in work.root_params if partial(p)]
        return rank0_numel(params, tp, n)

    return cached(work, ("tp_partial", tp, n, sp, blocks_only), compute)


def communication(work: Workload, plan: PlanPoint) -> dict:
    """Bytes and calls per mesh axis and kind for one optimizer step (rank 0)."""
    comm = CommTable()
    m = plan.accumulation
    for (axis, kind), (nbytes, calls) in _activation_collectives(work, plan).items():
        comm.add_total(axis, kind, nbytes * m, calls * m)
    if plan.tp > 1:
        # tp-partial gradients (every replicated parameter under SP, in-region ones always), once per step
        numel = tp_partial_rank0_numel(work, plan.tp, plan.fsdp if uses_fsdp(plan) else 1, plan.sp)
        if numel:
            comm.add("tp", "all_reduce", numel * 4, 1)

    # FSDP: all-gather each unit before its forward (and again in backward if resharded), reduce-scatter
    # (and all-reduce across replicas) on every micro-batch or only the last one (`grad_sync`)
    if uses_fsdp(plan):
        n = plan.fsdp
        pb, rb = DTYPE_BYTES[plan.param_dtype], DTYPE_BYTES[plan.reduce_dtype]
        padded_units = unit_padded_numels(work, plan.tp, n)
        for i, padded in enumerate(padded_units):
            is_root = i == len(padded_units) - 1
            gathers = 1 if (is_root or not plan.reshard_after_forward) else 2
            if n > 1:
                comm.add("dp_shard_cp", "all_gather", padded * pb, m * gathers)
                comm.add("dp_shard_cp", "reduce_scatter", padded * rb, plan.grad_syncs)
            if plan.dp_replicate > 1:
                comm.add("dp_replicate", "all_reduce", padded // n * rb, plan.grad_syncs)

    comm.add("world", "all_reduce", 8, 2)  # grad-norm² and loss, float64
    return comm.as_dict()


def axis_span(axis: str, plan: PlanPoint) -> tuple[int, int]:
    """(group size, span in consecutive ranks) of a mesh axis; tp is innermost, then cp, dp_shard, ..."""
    inner = {
        "tp": 1,
        "cp": plan.tp,
        "dp_shard": plan.tp * plan.cp,
        "dp_shard_cp": plan.tp,
        "dp_replicate": plan.tp * plan.cp * plan.dp_shard,
    }
    size = {
        "tp": plan.tp,
        "cp": plan.cp,
        "dp_shard": plan.dp_shard,
        "dp_shard_cp": plan.fsdp,
        "dp_replicate": plan.dp_replicate,
        "world": plan.world,
    }
    n = size.get(axis, plan.world)
    stride = inner.get(axis, 1)
    return n, n * stride if axis != "dp_shard_cp" else plan.tp * plan.fsdp


def collective_seconds(
    kind: str, nbytes: float, calls: int, axis: str, plan: PlanPoint, cluster: Cluster
) -> float:
    """Ring model: wire bytes per rank over the axis's bus bandwidth, plus a per-hop latency per call."""
    n, span = axis_span(axis, plan)
    if n <= 1 or calls == 0:
        return 0.0
    intra = span <= cluster.gpus_per_node
    bw = (cluster.intra_node_gbps if intra else cluster.inter_node_gbps) * 1e9
    lat = (cluster.intra_node_latency_us if intra else cluster.inter_node_latency_us) * 1e-6
    factor = {"all_reduce": 2.0 * (n - 1) / n, "all_to_all": (n - 1) / n}.get(kind, (n - 1) / n)
    return nbytes * factor / bw + calls * lat * (n - 1)
