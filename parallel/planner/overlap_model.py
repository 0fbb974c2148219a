"""Which collective hides behind which compute: the overlaps the engine performs, as the cost model sees them.

Why a table of rules: the planner must describe exactly what the engine overlaps (docs/planner.md,
"Overlap in the cost model"). Each rule names the collective, the compute it runs under and the chunk
count the engine uses; everything not named here is exposed. FSDP2's prefetch hides with
`parallel.overlap` on or off; every other rule needs it on. With it off the numbers are today's, bitwise.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from megagen.parallel.grad_reduction import BUCKET_BYTES
from megagen.parallel.planner.cluster import Cluster
from megagen.parallel.planner.comm_cost import collective_seconds, tp_partial_rank0_numel
from megagen.parallel.planner.overlap_exchanges import Exchange, exchanges
from megagen.parallel.planner.plan_point import PlanPoint, uses_fsdp
from megagen.parallel.planner.workload import Workload

FSDP_AXES = ("dp_shard_cp", "dp_replicate")

BACKWARD_SHARE = 2.0 / 3.0
"""Backward's share of a micro-batch's compute (its FLOPs are twice the forward's)."""


# ------------------------------------------------------------------------------------------ the rules
@dataclass(frozen=True)
class OverlapRule:
    """Collective `collective` on `axis` hides behind `behind`; `pattern` says how (`_hidden_seconds`)."""

    name: str
    axis: str
    collective: str
    behind: str
    pattern: str  # "behind": launched before the compute, waited after it; "pipelined": chunked, see below


RULES = {
    r.name: r
    for r in (
        OverlapRule(
            "fsdp_prefetch",
            "dp_shard_cp",
            "FSDP2 all-gather / reduce-scatter of the next / previous unit",
            "the current unit's forward / backward",
            "prefetch",
        ),
        OverlapRule(
            "cp_kv_gather",
            "cp",
            "one stacked K/V all-gather",
            "attention of the local K/V chunk (forward)",
            "behind",
        ),
        OverlapRule(
            "cp_dkv_scatter",
            "cp",
            "one stacked dK/dV reduce-scatter",
            "the local chunk's backward",
            "behind",
        ),
        OverlapRule(
            "ulysses_chunks",
            "cp",
            "stacked q/k/v all-to-all in, output all-to-all back, per head group (and reversed in backward)",
            "attention of the neighbouring head group",
            "pipelined",
        ),
        OverlapRule(
            "sp_pieces",
            "tp",
            "SP all-gather in, reduce-scatter out, per sequence piece (and reversed in backward)",
            "the neighbouring piece's body (GEMMs, cross-attention) in a token-wise region",
            "pipelined",
        ),
        OverlapRule(
            "sp_local_first",
            "tp",
            "SP all-gather into a region that is not token-wise (self-attention); its gradient's "
            "reduce-scatter in backward",
            "the region's column-parallel GEMMs on this rank's own rows (their backward in backward)",
            "behind",
        ),
        OverlapRule(
            "grad_buckets",
            "tp",
            "bucketed all-reduce of tp-partial gradients (under FSDP, of their shards)",
            "the rest of the last micro-batch's backward",
            "behind",
        ),
    )
}


def behind_exposed(comm_s: float, compute_s: float) -> float:
    """A collective launched before independent compute and waited after it shows only what is left."""
    return max(0.0, comm_s - compute_s)


def pipelined_exposed(send_s: float, back_s: float, compute_s: float, chunks: int) -> float:
    """`chunks` pieces, each sent in, computed, sent back: the first piece's send and the last's return are
    exposed; while piece i computes, piece i+1's send and piece i−1's return run, and what a window's
    traffic exceeds its compute is exposed too. With one chunk everything is exposed."""
    s, b, c = send_s / chunks, back_s / chunks, compute_s / chunks
    exposed = s + b
    if chunks > 1:
        exposed += behind_exposed(s, c) + behind_exposed(b, c)  # the first and the last window
        exposed += (chunks - 2) * behind_exposed(s + b, c)  # the middle windows carry both ways
    return exposed


# ------------------------------------------------------------------------------------------ exposure
@dataclass
class Exposure:
    """Exposed seconds per axis, their sum, what each rule hid and the chunk counts it assumed."""

    by_axis: dict[str, float] = field(default_factory=dict)
    total_s: float = 0.0
    hidden_by_rule: dict[str, float] = field(default_factory=dict)
    chunks: dict[str, int] = field(default_factory=dict)


def _hidden_seconds(ex: Exchange, plan: PlanPoint, cluster: Cluster) -> float:
    """Seconds of `ex`'s collectives that run under its compute, at most what they take unchunked (the
    accounting's calls), so an axis' exposed time never goes below zero."""
    axis = RULES[ex.rule].axis
    compute = ex.matmul_flops / (cluster.peak_flops * cluster.matmul_efficiency)
    compute += ex.attention_flops / (cluster.peak_flops * cluster.attention_efficiency)
    parts = [p for p in (ex.send, ex.back) if p is not None]
    whole = sum(collective_seconds(k, n, 1, axis, plan, cluster) for k, n in parts)
    chunked = [collective_seconds(k, n, ex.chunks, axis, plan, cluster) for k, n in parts]
    if RULES[ex.rule].pattern == "pipelined":
        send, back = chunked[0], chunked[1] if len(chunked) > 1 else 0.0
        exposed = pipelined_exposed(send, back, compute, ex.chunks)
    else:
        exposed = behind_exposed(sum(chunked), compute)
    return min(whole, max(0.0, sum(chunked) - exposed))


def grad_bucket_hidden(work: Workload, plan: PlanPoint, cluster: Cluster, compute_s: float) -> float:
    """BucketedPartialSum: buckets of ~BUCKET_BYTES all-reduced as backward finishes them (under FSDP,
    FSDP's shards of them, as each unit's reduce-scatter ends), waited before clipping. All but the last
    bucket hide behind the rest of the last micro-batch's backward; under FSDP the root unit's gradients
    come last of all (its post-backward ends backward), so only buckets the blocks fill launch early."""
    if not (plan.overlap and plan.tp > 1):
        return 0.0
    n = plan.fsdp if uses_fsdp(plan) else 1
    nbytes = tp_partial_rank0_numel(work, plan.tp, n, plan.sp) * 4
    if not nbytes:
        return 0.0
    early_bytes = (-(-nbytes // BUCKET_BYTES) - 1) * BUCKET_BYTES
    if uses_fsdp(plan):
        blocks = tp_partial_rank0_numel(work, plan.tp, n, plan.sp, blocks_only=True) * 4
        early_bytes = min(early_bytes, blocks // BUCKET_BYTES * BUCKET_BYTES)
    if not early_bytes:
        return 0.0
    whole = collective_seconds("all_reduce", nbytes, 1, "tp", plan, cluster)
    early = collective_seconds("all_reduce", early_bytes, early_bytes // BUCKET_BYTES, "tp", plan, cluster)
    backward = compute_s / plan.accumulation * BACKWARD_SHARE
    return min(whole, max(0.0, early - behind_exposed(early, backward)))


def fsdp_exposed(overlappable: float, compute_s: float, layers: int) -> float:
    """FSDP2 prefetch: each micro-batch's first all-gathers (the root, then block 0) and each gradient
    sync's last reduce-scatters (block 0, then the root) cannot hide: 2/units of the step's FSDP traffic;
    the rest hides behind compute."""
    units = max(1, layers + 1)
    edge = overlappable * 2 / units
    return edge + max(0.0, overlappable - edge - compute_s)


def exposure(
    work: Workload, plan: PlanPoint, cluster: Cluster, comm_s: dict[str, float], compute_s: float
) -> Exposure:
    """Exposed communication per axis of one step, given each axis' collective seconds and the compute."""
    result = Exposure()
    m = plan.accumulation
    for ex, count in exchanges(work, plan, cluster.device_type).items():
        hidden = _hidden_seconds(ex, plan, cluster) * count * m
        result.hidden_by_rule[ex.rule] = result.hidden_by_rule.get(ex.rule, 0.0) + hidden
        if RULES[ex.rule].pattern == "pipelined":
            result.chunks[ex.rule] = max(result.chunks.get(ex.rule, 1), ex.chunks)
    grads = grad_bucket_hidden(work, plan, cluster, compute_s)
    if grads:
        result.hidden_by_rule["grad_buckets"] = grads
    hidden_on = Counter()
    for rule, seconds in result.hidden_by_rule.items():
        hidden_on[RULES[rule].axis] += seconds
    overlappable = sum(t for axis, t in comm_s.items() if axis in FSDP_AXES)
    fsdp = fsdp_exposed(overlappable, compute_s, work.layers)
    exposed = 0.0
    for axis, t_axis in comm_s.items():
        if axis in FSDP_AXES:
            result.by_axis[axis] = fsdp * t_axis / overlappable if overlappable else 0.0
        else:
            result.by_axis[axis] = max(0.0, t_axis - hidden_on[axis])
            exposed += result.by_axis[axis]
    result.total_s = exposed + fsdp
    if overlappable:
        result.hidden_by_rule["fsdp_prefetch"] = overlappable - fsdp
    return result
