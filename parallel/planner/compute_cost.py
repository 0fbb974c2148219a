"""Compute per rank: matmul and attention FLOPs, recomputed FLOPs, and the memory-bound elementwise time."""

from __future__ import annotations

from megagen.parallel.planner.cluster import Cluster
from megagen.parallel.planner.plan_point import DTYPE_BYTES, PlanPoint, padded_tokens
from megagen.parallel.planner.workload import Workload, cached


def flops_per_rank(work: Workload, plan: PlanPoint) -> tuple[float, float, float]:
    """(matmul, attention, model) FLOPs one rank executes per optimizer step (see `_flops_per_rank`)."""
    key = ("flops", plan.tp, plan.cp, plan.sp, plan.micro_batch * plan.accumulation)
    return cached(work, key, lambda: _flops_per_rank(work, plan))


def _flops_per_rank(work: Workload, plan: PlanPoint) -> tuple[float, float, float]:
    """(matmul FLOPs, attention FLOPs, model FLOPs) one rank executes per optimizer step, forward+backward.

    Column/row-parallel linears are split over tp; linears on the sharded sequence see this rank's tokens;
    linears on unsharded inputs (text, timestep) are repeated on every rank (duplicated compute); attention
    rows are split over cp and heads over tp. Recomputation is added by `step_cost`.
    """
    s_pad = padded_tokens(work.tokens, plan)
    shards = plan.cp * (plan.tp if plan.sp else 1)
    per_sample = plan.micro_batch * plan.accumulation
    mm = 0.0
    for lin in work.linears:
        if lin.tokens == work.tokens:
            tokens = s_pad / plan.cp if lin.style in ("col", "row") else s_pad / shards
        else:
            tokens = lin.tokens
        width = lin.d_out / plan.tp if lin.style in ("col", "row") else lin.d_out
        mm += 2.0 * tokens * lin.d_in * width
    attn = 0.0
    for att in work.attention:
        q = s_pad / plan.cp if att.q_tokens == work.tokens else att.q_tokens
        kv = s_pad if att.kv_tokens == work.tokens else att.kv_tokens
        attn += 4.0 * q * kv * att.width / plan.tp * (0.5 if att.causal else 1.0)
    fwd_mm, fwd_attn = mm * per_sample, attn * per_sample
    return 3.0 * fwd_mm, 3.0 * fwd_attn, 3.0 * (fwd_mm + fwd_attn)


def recomputed_flops(work: Workload, plan: PlanPoint) -> tuple[float, float]:
    """Forward (matmul, attention) FLOPs per rank of the blocks that are recomputed."""
    mm_all, attn_all, _ = flops_per_rank(work, plan)
    mm_fwd, attn_fwd = mm_all / 3.0, attn_all / 3.0
    block_mm = sum(1 for lin in work.linears if lin.in_block) / max(1, len(work.linears))
    if plan.recompute == "full":
        frac = plan.recomputed_blocks(work.layers) / work.layers
        return mm_fwd * block_mm * frac, attn_fwd * frac
    if plan.recompute == "selective":
        return 0.0, attn_fwd
    return 0.0, 0.0


ELEMENTWISE_PASSES = 24
"""Memory passes over a (tokens × width) activation per block, forward + backward: norms (read, write,
and their backward), adaLN modulation and gates, residual adds, the MLP activation and its gradient, and
the attention-layout transposes. An estimate from counting the ops of a Llama-style block (×3 for
backward), not a fitted number; these kernels are bound by HBM bandwidth, not by FLOPs."""


def elementwise_seconds(work: Workload, plan: PlanPoint, cluster: Cluster) -> float:
    """Time of the memory-bound elementwise work per step on one rank (HBM bandwidth)."""
    if not cluster.hbm_gbps:
        return 0.0
    s_pad = padded_tokens(work.tokens, plan)
    tokens = s_pad / (plan.cp * (plan.tp if plan.sp else 1)) * plan.micro_batch * plan.accumulation
    nbytes = ELEMENTWISE_PASSES * tokens * (work.hidden or 0) * DTYPE_BYTES[plan.param_dtype] * work.layers
    return nbytes / (cluster.hbm_gbps * 1e9)
