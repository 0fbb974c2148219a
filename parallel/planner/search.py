"""Enumerate feasible parallel layouts for a workload on a cluster and rank them by predicted step time."""

from __future__ import annotations

from dataclasses import dataclass, replace

from megagen.parallel.planner.cluster import Cluster
from megagen.parallel.planner.plan_point import PlanPoint
from megagen.parallel.planner.step_cost import Cost, step_cost, step_cost_with_overlap
from megagen.parallel.planner.workload import Workload


@dataclass
class RankedPlan:
    plan: PlanPoint
    cost: Cost
    mfu: float
    tokens_per_s_per_gpu: float
    fits: bool

    def row(self) -> dict:
        c = self.cost
        return {
            "plan": self.plan.label(),
            "step_s": c.step_s,
            "mfu": self.mfu,
            "exposed_comm_pct": 100.0 * c.exposed_comm_s / c.step_s if c.step_s else 0.0,
            "exposed_s_per_axis": c.exposed_by_axis,
            "overlap_chunks": c.overlap_chunks,
            "peak_memory_gb": c.peak_memory_bytes / 2**30,
            "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu,
            "fits": self.fits,
        }


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _recompute_choices(layers: int) -> list[tuple[str, int]]:
    """none, selective, full on every block, and full on the first quarter / half / three quarters of the
    blocks — each distinct count once, never 0 blocks (that is `none`) or all of them (that is `full`)."""
    partial = sorted({k for k in (layers // 4, layers // 2, 3 * layers // 4) if 0 < k < layers})
    return [("none", -1), ("selective", -1), ("full", -1)] + [("full", k) for k in partial]


MAX_CP = 32
"""Largest context-parallel size searched: any divisor of the world over tp up to it, not only powers of 2."""

MAX_MICRO_BATCH = 8


def _grad_sync_choices(per_rank: int, micro_batch: int, uses_fsdp: bool) -> list[str]:
    """Both gradient-sync schedules where they differ (FSDP with accumulation), else the default."""
    return ["last_micro", "every_micro"] if uses_fsdp and per_rank > micro_batch else ["last_micro"]


def candidate_plans(
    work: Workload, gpus: int, global_batch: int, cluster: Cluster, dtype: str
) -> list[PlanPoint]:
    """Every (tp, cp, cp kind, dp_shard, dp_replicate, micro-batch, recompute, grad sync) the engine can
    run: tp divides the node and the heads, cp and the data-parallel size are any factors that divide
    (3 and 6 as well as powers of two), and the data-parallel size divides the global batch."""
    heads = work.heads or 1
    plans = []
    for tp in [d for d in _divisors(cluster.gpus_per_node) if heads % d == 0 and gpus % d == 0]:
        for cp in [c for c in _divisors(gpus // tp) if c <= min(MAX_CP, work.tokens)]:
            dp = gpus // (tp * cp)
            if global_batch % dp:
                continue
            per_rank = global_batch // dp
            kinds = (
                ["allgather_kv"]
                if cp == 1
                else ["allgather_kv"] + (["ulysses"] if heads % (tp * cp) == 0 else [])
            )
            replicas = [r for r in _divisors(dp) if r == 1 or (dp // r) * tp * cp >= cluster.gpus_per_node]
            for kind in kinds:
                for rep in replicas[:4]:
                    uses_fsdp = dp * cp > 1
                    for mb in [m for m in _divisors(per_rank) if m <= MAX_MICRO_BATCH]:
                        for sync in _grad_sync_choices(per_rank, mb, uses_fsdp):
                            for recompute, k in _recompute_choices(work.layers):
                                plans.append(
                                    PlanPoint(
                                        dp_replicate=rep,
                                        dp_shard=dp // rep,
                                        cp=cp,
                                        tp=tp,
                                        cp_kind=kind,
                                        micro_batch=mb,
                                        accumulation=per_rank // mb,
                                        recompute=recompute,
                                        recompute_layers=k,
                                        param_dtype=dtype,
                                        reduce_dtype="fp32",
                                        grad_sync=sync,
                                    )
                                )
    return plans


def with_cheaper_overlap(work: Workload, plan: PlanPoint, cluster: Cluster) -> tuple[PlanPoint, Cost]:
    """`plan` with `parallel.overlap` on where that hides more (a faster step), else off: only TP and CP
    traffic has overlaps to switch (FSDP prefetches either way). A tie keeps it off, today's engine."""
    off_plan = replace(plan, overlap=False)
    off = step_cost(work, off_plan, cluster)
    if plan.tp == 1 and plan.cp == 1:
        return off_plan, off
    on_plan = replace(plan, overlap=True)
    on = step_cost_with_overlap(work, on_plan, cluster, off)
    return (on_plan, on) if on.step_s < off.step_s else (off_plan, off)


def search(work: Workload, gpus: int, global_batch: int, cluster: Cluster, top: int = 10) -> list[RankedPlan]:
    """Cost every candidate, with overlap on or off, whichever is faster; feasible plans (fit in memory)
    first, fastest first."""
    usable = (cluster.memory_gb - cluster.memory_reserved_gb) * 2**30
    ranked = []
    for candidate in candidate_plans(work, gpus, global_batch, cluster, cluster.dtype):
        plan, cost = with_cheaper_overlap(work, candidate, cluster)
        fits = cost.peak_memory_bytes <= usable
        mfu = cost.model_flops_per_rank / cost.step_s / cluster.peak_flops if cost.step_s else 0.0
        tokens = global_batch * work.tokens / cost.step_s / gpus if cost.step_s else 0.0
        ranked.append(RankedPlan(plan, cost, mfu, tokens, fits))
    ranked.sort(key=lambda r: (not r.fits, r.cost.step_s))
    return ranked[:top]
