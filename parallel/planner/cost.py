"""The activation model: saved activations per rank and the TP/SP and CP collectives of one micro-batch.

Byte counts follow the engine (parallel/tensor_parallel.py, context_parallel.py) in the accounting
convention of parallel/comm.py; `comm_cost.communication` adds them up per step.
"""

from __future__ import annotations

from megagen.parallel.planner.activations import between_share, saved_bytes_by_layer
from megagen.parallel.planner.comm_table import CommTable as _Comm
from megagen.parallel.planner.plan_point import DTYPE_BYTES, PlanPoint, padded_tokens
from megagen.parallel.planner.workload import Workload
from megagen.parallel.planner.workload import cached as _cached


def _activation_collectives(work: Workload, plan: PlanPoint) -> dict[tuple[str, str], tuple[int, int]]:
    """TP/SP and CP collectives of ONE micro-batch, {(axis, kind): (bytes, calls)}; a step repeats them for
    each micro-batch. Cached per (tp, cp, SP, CP kind, micro-batch, dtype, recomputed blocks)."""
    recomputed = plan.recomputed_blocks(work.layers)
    key = (
        "activations",
        plan.tp,
        plan.cp,
        plan.sp,
        plan.cp_kind,
        plan.micro_batch,
        plan.param_dtype,
        recomputed,
        plan.overlap,
    )
    return _cached(work, key, lambda: _activation_collectives_uncached(work, plan, recomputed))


def _activation_collectives_uncached(work: Workload, plan: PlanPoint, recomputed: int) -> dict:
    comm = _Comm()
    fa = DTYPE_BYTES[plan.param_dtype]  # activations travel in the compute dtype
    b = plan.micro_batch
    s_pad = padded_tokens(work.tokens, plan)
    s_cp = s_pad // plan.cp

    def seq_tokens(tokens: int) -> int:
        """Per-rank tokens of a region input: the cp-local sequence, or unsharded (e.g. text) tokens."""
        return s_cp if tokens == work.tokens else tokens

    # tensor parallel; forward collectives repeat for recomputed blocks
    if plan.tp > 1:
        for layer in range(work.layers):
            repeats = 2 if layer < recomputed else 1
            regions, rows, _ = work.layer_items(layer)
            for r in regions:
                for tokens, width in r.seq:
                    nbytes = b * seq_tokens(tokens) * width * fa
                    if plan.sp:
                        comm.add("tp", "all_gather", nbytes, repeats)
                        comm.add("tp", "reduce_scatter", nbytes, 1)
                    else:
                        comm.add("tp", "all_reduce", nbytes, 1)
                if not plan.sp:
                    for tokens, width in r.replicated:
                        comm.add("tp", "all_reduce", b * tokens * width * fa, 1)
                elif r.tables:  # gathered with the sequence, in their own dtype; no gradient
                    for tokens, per_token in r.tables:
                        comm.add("tp", "all_gather", seq_tokens(tokens) * per_token, repeats)
            for tokens in work.layer_norm_sums(layer):  # fp32 sums of squares, forward and backward
                comm.add("tp", "all_reduce", b * seq_tokens(tokens) * 4, repeats + 1)
            for lin in rows:
                nbytes = b * seq_tokens(lin.tokens) * lin.d_out * fa
                if plan.sp:
                    comm.add("tp", "reduce_scatter", nbytes, repeats)
                    comm.add("tp", "all_gather", nbytes, 1)
                else:
                    comm.add("tp", "all_reduce", nbytes, repeats)

    # context parallel, per self-attention call
    overlap = plan.overlap  # parallel.overlap: stacked K/V (and q/k/v) collectives
    if plan.cp > 1:
        for layer in range(work.layers):
            repeats = 2 if layer < recomputed else 1
            for att in work.layer_items(layer)[2]:
                width = att.width // plan.tp
                if plan.cp_kind == "allgather_kv":
                    nbytes = b * s_pad * width * fa
                    _add_allgather_kv(comm, nbytes, repeats, overlap)
                else:
                    nbytes = b * s_cp * width * fa
                    _add_ulysses(comm, nbytes, repeats, overlap)
    return {(a, k): (v[0], v[1]) for a, kinds in comm.table.items() for k, v in kinds.items()}


def _add_allgather_kv(comm: _Comm, nbytes: int, repeats: int, overlap: bool) -> None:
    """K and V gathered (and dK, dV reduce-scattered) separately, or stacked in one call with overlap."""
    if overlap:
        comm.add("cp", "all_gather", 2 * nbytes, repeats)
        comm.add("cp", "reduce_scatter", 2 * nbytes, 1)
    else:
        comm.add("cp", "all_gather", nbytes, 2 * repeats)
        comm.add("cp", "reduce_scatter", nbytes, 2)


def _add_ulysses(comm: _Comm, nbytes: int, repeats: int, overlap: bool) -> None:
    """q, k, v and the output each way: four all-to-alls, or stacked q/k/v plus the output with overlap."""
    if overlap:
        comm.add("cp", "all_to_all", 3 * nbytes, repeats + 1)
        comm.add("cp", "all_to_all", nbytes, repeats + 1)
    else:
        comm.add("cp", "all_to_all", nbytes, 4 * repeats + 4)


# ----------------------------------------------------------------------------------------------- memory


def activation_bytes(work: Workload, plan: PlanPoint) -> tuple[float, float]:
    """(saved activations at the peak of one micro-batch, of which duplicated across tp ranks), per rank.

    Per block and token, in the compute dtype: what autograd keeps for each op of a Llama-style block
    with cross-attention (inputs of every linear, norm inputs, gates, the attention output and its
    log-sum-exp); linear inputs inside a tp region are width/tp, between regions the sequence is sharded
    over tp with SP and duplicated without it. Full recompute keeps only each block's input (plus one
    block's worth while it recomputes); selective keeps linear outputs and collective outputs.
    """
    if work.saved is not None and plan.recompute != "selective":
        return _traced_activation_bytes(work, plan)
    fa = DTYPE_BYTES[plan.param_dtype]
    s_pad = padded_tokens(work.tokens, plan)
    tok_region = s_pad / plan.cp  # tokens inside a tp region (gathered)
    tok_between = s_pad / (plan.cp * (plan.tp if plan.sp else 1))
    d = work.hidden or 1
    per_block_none = 0.0
    per_block_sel = 0.0
    in_block = _cached(
        work,
        ("first_block_linears",),
        lambda: [lin for lin in work.linears if lin.in_block and lin.name.startswith("blocks.0.")],
    )
    for lin in in_block:
        tokens = tok_region if lin.tokens == work.tokens else lin.tokens
        d_in = lin.d_in / plan.tp if lin.style == "row" else lin.d_in
        d_out = lin.d_out / plan.tp if lin.style in ("col", "row") else lin.d_out
        per_block_none += tokens * (d_in + d_out)  # input kept for the weight grad, output for the next op
        per_block_sel += tokens * d_out
    between = 8.0 * tok_between * d  # residual stream, norm inputs/outputs, gates (per block)
    dup = 0.0 if plan.sp or plan.tp == 1 else between * (plan.tp - 1) / plan.tp
    per_block_none += between
    per_block_sel += 2.0 * tok_between * d
    b = plan.micro_batch * fa
    layers = work.layers
    if plan.recompute == "full":
        k = plan.recomputed_blocks(layers)
        kept = k * tok_between * d + (layers - k) * per_block_none + (per_block_none if k else 0.0)
    elif plan.recompute == "selective":
        kept = layers * per_block_sel
    else:
        kept = layers * per_block_none
    return kept * b, dup * layers * b


def _traced_activation_bytes(work: Workload, plan: PlanPoint) -> tuple[float, float]:
    """`activation_bytes` from the traced saved tensors (planner/activations.py). Full recompute keeps
    each recomputed block's input, the rest whole, and one recomputed block's worth while it runs."""
    pad = padded_tokens(work.tokens, plan) / work.tokens
    fa = DTYPE_BYTES[plan.param_dtype]
    by_layer, dup = saved_bytes_by_layer(work.saved, plan, fa, pad)
    blocks = [by_layer.get(i, 0.0) for i in range(work.layers)]
    kept = by_layer.get(None, 0.0)
    k = plan.recomputed_blocks(work.layers)
    if k:
        block_input = work.tokens * between_share(plan, pad) * (work.hidden or 1) * fa
        kept += k * block_input + sum(blocks[k:]) + max(blocks[:k])
    else:
        kept += sum(blocks)
    return kept * plan.micro_batch, dup * plan.micro_batch
