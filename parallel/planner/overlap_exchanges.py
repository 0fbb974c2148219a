"""What each micro-batch exchanges under `parallel.overlap`: per overlapped collective, its bytes, the
compute it runs under and the chunk count the engine uses — the inputs of overlap_model.py's rules.

Why separate from the rules: this part follows the engine's code path by path (parallel/cp_overlap.py,
ulysses_pipeline.py, sp_pipeline.py) and knows nothing of time; the rules turn it into seconds.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from megagen.parallel.overlap_schedule import ulysses_head_chunks
from megagen.parallel.planner.plan_point import DTYPE_BYTES, PlanPoint, padded_tokens
from megagen.parallel.planner.workload import AttentionUse, LinearUse, RegionUse, Workload, cached
from megagen.parallel.tp_overlap_schedule import local_first_pays, sp_pieces


@dataclass(frozen=True)
class Exchange:
    """One overlapped exchange of a micro-batch: collectives (kind, bytes) sent before (`send`) and after
    (`back`) compute of `matmul_flops` + `attention_flops`, in `chunks` pieces; `rule` names its rule."""

    rule: str
    send: tuple[str, int]
    back: tuple[str, int] | None = None
    matmul_flops: float = 0.0
    attention_flops: float = 0.0
    chunks: int = 1


def exchanges(work: Workload, plan: PlanPoint, device: str) -> Counter:
    """{Exchange: times per micro-batch} of every overlap `parallel.overlap` turns on (cached per layout);
    `device` is the cluster's device type (`Cluster.device_type`), which the chunking rules depend on."""
    if not plan.overlap:
        return Counter()
    recomputed = plan.recomputed_blocks(work.layers)
    key = ("overlap", *_layout(plan, device), recomputed)
    return cached(work, key, lambda: _count(work, plan, recomputed, device))


def _layout(plan: PlanPoint, device: str) -> tuple:
    """What the exchanges of a block depend on: the cache key of both caches here."""
    return (plan.tp, plan.cp, plan.sp, plan.cp_kind, plan.micro_batch, plan.param_dtype, device)


def _count(work: Workload, plan: PlanPoint, recomputed: int, device: str) -> Counter:
    found: Counter = Counter()
    for layer, (forward, backward) in enumerate(_layer_exchanges(work, plan, device)):
        repeats = 2 if layer < recomputed else 1  # a recomputed block's forward runs again in backward
        for ex in forward:
            found[ex] += repeats
        for ex in backward:
            found[ex] += 1
    return found


def _layer_exchanges(
    work: Workload, plan: PlanPoint, device: str
) -> list[tuple[list[Exchange], list[Exchange]]]:
    """Per block: (forward exchanges, backward exchanges), whatever the recompute (cached per layout)."""

    def compute():
        out = []
        for layer in range(work.layers):
            pairs = list(_cp_exchanges(work, plan, layer, device)) if plan.cp > 1 else []
            pairs += list(_sp_exchanges(work, plan, layer)) if plan.sp else []
            out.append(([fwd for fwd, _ in pairs], [bwd for _, bwd in pairs]))
        return out

    return cached(work, ("overlap-layers", *_layout(plan, device)), compute)


def _cp_exchanges(work: Workload, plan: PlanPoint, layer: int, device: str):
    """(forward, backward) exchanges of each CP self-attention of block `layer`."""
    fa, b = DTYPE_BYTES[plan.param_dtype], plan.micro_batch
    s_pad = padded_tokens(work.tokens, plan)
    s_cp = s_pad // plan.cp
    for att in work.layer_items(layer)[2]:
        width = att.width // plan.tp
        attn = 4.0 * b * s_cp * s_pad * width * (0.5 if att.causal else 1.0)  # this rank's forward FLOPs
        if plan.cp_kind == "allgather_kv":
            # cp_overlap.py: the stacked K/V gather runs under the local chunk's attention (1/cp of the
            # keys); backward does the remote chunks first, then the local chunk under the dK/dV scatter
            kv = 2 * b * s_pad * width * fa
            local = attn / plan.cp
            yield (
                Exchange("cp_kv_gather", ("all_gather", kv), attention_flops=local),
                Exchange("cp_dkv_scatter", ("reduce_scatter", kv), attention_flops=2.0 * local),
            )
        else:
            # ulysses_pipeline.py: head groups in, attention, out; backward the same pipeline reversed
            one = b * s_cp * width * fa
            heads = work.heads or 1
            chunks = ulysses_head_chunks(heads // plan.tp, plan.cp, s_cp, att.width // heads, device)
            qkv, out = ("all_to_all", 3 * one), ("all_to_all", one)
            yield (
                Exchange("ulysses_chunks", qkv, out, attention_flops=attn, chunks=chunks),
                Exchange("ulysses_chunks", out, qkv, attention_flops=2.0 * attn, chunks=chunks),
            )


def _inside(work: Workload) -> dict[str, tuple[list[LinearUse], list[AttentionUse]]]:
    """{region name: (its linears, its attention cores)} (cached per workload)."""

    def compute():
        found: dict[str, tuple[list, list]] = {r.name: ([], []) for r in work.regions}
        for items, slot in ((work.linears, 0), (work.attention, 1)):
            for item in items:
                parts = item.name.split(".")
                for i in range(1, len(parts)):
                    owner = found.get(".".join(parts[:i]))
                    if owner is not None:
                        owner[slot].append(item)
        return found

    return cached(work, ("region-contents",), compute)


def _sp_exchanges(work: Workload, plan: PlanPoint, layer: int):
    """(forward, backward) exchanges of each TP region of block `layer` under SP (region_overlap.py): a
    token-wise region runs in pieces, any other runs the sequence input feeding its column linears local
    rows first."""
    s_cp = padded_tokens(work.tokens, plan) // plan.cp
    regions, rows, _ = work.layer_items(layer)
    for region in regions:
        if not region.seq:
            continue
        if region.token_wise:
            yield _pieces_exchanges(work, plan, region, rows)
        else:
            columns = [lin for lin in _inside(work).get(region.name, ([], []))[0] if lin.style == "col"]
            widths = {lin.d_in for lin in columns}
            fed = next(((t, w) for t, w in region.seq if w in widths), None)  # the first one, as the engine
            if fed is not None and local_first_pays(s_cp // plan.tp, fed[1], plan.tp):
                yield _local_first_exchanges(work, plan, fed, columns)


def _pieces_exchanges(work: Workload, plan: PlanPoint, region: RegionUse, rows: list[LinearUse]):
    """sp_pipeline.py: the region's body (its GEMMs and any cross-attention core) per sequence piece,
    the next piece's gather and the previous one's reduce-scatter under it; backward likewise."""
    fa, b = DTYPE_BYTES[plan.param_dtype], plan.micro_batch
    s_cp = padded_tokens(work.tokens, plan) // plan.cp

    def tokens_of(tokens: int) -> int:
        return s_cp if tokens == work.tokens else tokens

    linears, cores = _inside(work).get(region.name, ([], []))
    prefix = region.name + "."
    gathered = sum(b * tokens_of(t) * w * fa for t, w in region.seq)
    scattered = sum(b * tokens_of(r.tokens) * r.d_out * fa for r in rows if r.name.startswith(prefix))
    mm = sum(
        2.0 * b * tokens_of(lin.tokens) * lin.d_in * lin.d_out / plan.tp
        for lin in linears
        if lin.style in ("col", "row")
    )
    attn = sum(4.0 * b * tokens_of(a.q_tokens) * a.kv_tokens * a.width / plan.tp for a in cores)  # cross
    pieces = sp_pieces(s_cp // plan.tp, region.seq[0][1], plan.tp)
    into, out = ("all_gather", gathered), ("reduce_scatter", scattered)
    grad_in, grad_out = ("all_gather", scattered), ("reduce_scatter", gathered)
    return (
        Exchange("sp_pieces", into, out, mm, attn, pieces),
        Exchange("sp_pieces", grad_in, grad_out, 2.0 * mm, 2.0 * attn, pieces),
    )


def _local_first_exchanges(work: Workload, plan: PlanPoint, fed: tuple[int, int], columns: list[LinearUse]):
    """sp_local_first.py: the all-gather of the sequence input `fed` (tokens, width) under the column GEMMs
    of this rank's own rows that read it; in backward its gradient's reduce-scatter under their backward.
    Other sequence inputs of the region (e.g. rotary tables) are gathered as usual: exposed."""
    fa, b = DTYPE_BYTES[plan.param_dtype], plan.micro_batch
    tokens, width = fed
    s_local = padded_tokens(work.tokens, plan) // (plan.cp * plan.tp) if tokens == work.tokens else tokens
    gathered = b * s_local * plan.tp * width * fa
    local = sum(
        2.0 * b * s_local * lin.d_in * lin.d_out / plan.tp
        for lin in columns
        if lin.d_in == width and lin.tokens == tokens
    )
    return (
        Exchange("sp_local_first", ("all_gather", gathered), matmul_flops=local),
        Exchange("sp_local_first", ("reduce_scatter", gathered), matmul_flops=2.0 * local),
    )
