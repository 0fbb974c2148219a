"""The cost model: bytes of every collective per mesh axis, memory per rank, FLOPs and step time.

Byte counts follow the engine exactly (parallel/tensor_parallel.py, context_parallel.py, fsdp.py,
runtime.py) with the accounting convention of parallel/comm.py: all-gather = output bytes, reduce-scatter
and all-to-all = input bytes, all-reduce = tensor bytes; all for rank 0 (FSDP gives rank 0 the largest
shard of an uneven parameter). Time uses a ring model per collective and the cluster's efficiencies.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from megagen.parallel.grad_reduction import BETWEEN, SHARDED, partial_over_tp
from megagen.parallel.planner.activations import saved_bytes_by_layer
from megagen.parallel.planner.cluster import Cluster
from megagen.parallel.planner.workload import ParamShape, Workload

DTYPE_BYTES = {"fp32": 4, "bf16": 2}


@dataclass(frozen=True)
class PlanPoint:
    """One parallel layout and schedule to cost."""

    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1
    cp_kind: str = "allgather_kv"
    sequence_parallel: bool = True
    micro_batch: int = 1
    accumulation: int = 1
    recompute: str = "none"
    recompute_layers: int = -1
    """With recompute=full: how many blocks recompute (-1 = all)."""
    param_dtype: str = "fp32"
    reduce_dtype: str = "fp32"
    reshard_after_forward: bool = True
    grad_sync: str = "last_micro"
    """FSDP with accumulation: reduce every micro-batch (every_micro) or keep unsharded gradients until the
    last (last_micro, FSDP2 no-sync)."""

    @property
    def world(self) -> int:
        return self.dp_replicate * self.dp_shard * self.cp * self.tp

    @property
    def fsdp(self) -> int:
        return self.dp_shard * self.cp

    @property
    def sp(self) -> bool:
        return self.sequence_parallel and self.tp > 1

    @property
    def grad_syncs(self) -> int:
        """Gradient reductions (FSDP reduce-scatter / HSDP all-reduce per unit) per optimizer step."""
        return self.accumulation if self.grad_sync == "every_micro" else 1

    @property
    def holds_unsharded_grads(self) -> bool:
        """FSDP no-sync: micro-batches before the last keep each unit's full (tp-local) gradient."""
        return self.grad_sync == "last_micro" and self.accumulation > 1 and _uses_fsdp(self)

    def recomputed_blocks(self, layers: int) -> int:
        if self.recompute != "full":
            return 0
        return layers if self.recompute_layers < 0 else min(layers, self.recompute_layers)

    def label(self) -> str:
        parts = [f"tp{self.tp}{'+sp' if self.sp else ''}", f"cp{self.cp}"]
        if self.cp > 1:
            parts[-1] += "-ag" if self.cp_kind == "allgather_kv" else "-uly"
        parts.append(f"fsdp{self.dp_shard}")
        if self.dp_replicate > 1:
            parts.append(f"rep{self.dp_replicate}")
        parts.append(f"mb{self.micro_batch}")
        rc = self.recompute
        if rc == "full" and self.recompute_layers >= 0:
            rc = f"full{self.recompute_layers}"
        parts.append(f"rc:{rc}")
        if self.accumulation > 1 and _uses_fsdp(self):
            parts.append("sync:every" if self.grad_sync == "every_micro" else "sync:last")
        return " ".join(parts)


@dataclass
class Cost:
    """Everything the planner predicts for one plan."""

    comm: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    """{axis: {kind: {"bytes": int, "calls": int}}} for one optimizer step on rank 0."""
    param_bytes: int = 0
    grad_bytes: int = 0
    optimizer_bytes: int = 0
    activation_bytes: float = 0.0
    transient_bytes: float = 0.0
    model_flops_per_rank: float = 0.0
    hardware_flops_per_rank: float = 0.0
    compute_s: float = 0.0
    comm_s: dict[str, float] = field(default_factory=dict)
    exposed_comm_s: float = 0.0
    step_s: float = 0.0
    duplicated_activation_bytes: float = 0.0

    @property
    def peak_memory_bytes(self) -> float:
        return (
            self.param_bytes
            + self.grad_bytes
            + self.optimizer_bytes
            + self.activation_bytes
            + self.transient_bytes
        )

    def bytes_by_axis(self) -> dict[str, int]:
        return {a: sum(v["bytes"] for v in kinds.values()) for a, kinds in self.comm.items()}


class _Comm:
    def __init__(self):
        self.table = defaultdict(lambda: defaultdict(lambda: [0, 0]))

    def add(self, axis: str, kind: str, nbytes: float, calls: int = 1) -> None:
        if calls <= 0:
            return
        cell = self.table[axis][kind]
        cell[0] += int(nbytes) * calls
        cell[1] += calls

    def add_total(self, axis: str, kind: str, nbytes: int, calls: int) -> None:
        """`calls` collectives moving `nbytes` in all."""
        if calls > 0:
            cell = self.table[axis][kind]
            cell[0] += nbytes
            cell[1] += calls

    def as_dict(self) -> dict:
        return {
            a: {k: {"bytes": v[0], "calls": v[1]} for k, v in kinds.items()}
            for a, kinds in self.table.items()
        }


def padded_tokens(tokens: int, plan: PlanPoint) -> int:
    shards = plan.cp * (plan.tp if plan.sp else 1)
    return -(-tokens // shards) * shards


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


def _cached(work: Workload, key: tuple, compute):
    cache = work.__dict__.setdefault("_cost_cache", {})
    if key not in cache:
        cache[key] = compute()
    return cache[key]


def unit_padded_numels(work: Workload, tp: int, n: int) -> list[int]:
    """FSDP-padded elements of each unit (blocks, then the root) at (tp, shard size n)."""
    units = [*work.block_params, work.root_params]
    return _cached(work, ("padded", tp, n), lambda: [fsdp_padded_numel(u, tp, n) for u in units])


def tp_partial_rank0_numel(work: Workload, tp: int, n: int, sp: bool) -> int:
    """Elements of rank 0's gradients that are partial over tp (the gradient rule of grad_reduction.py)."""

    def partial(p: ParamShape) -> bool:
        cls = p.grad_class or (SHARDED if p.tp_dim is not None else BETWEEN)
        return partial_over_tp(cls, sp)

    def compute():
        params = [p for blk in work.block_params for p in blk if partial(p)]
        params += [p for p in work.root_params if partial(p)]
        return rank0_numel(params, tp, n)

    return _cached(work, ("tp_partial", tp, n, sp), compute)


def _activation_collectives(work: Workload, plan: PlanPoint) -> dict[tuple[str, str], tuple[int, int]]:
    """TP/SP and CP collectives of ONE micro-batch, {(axis, kind): (bytes, calls)}; a step repeats them for
    each micro-batch. Cached per (tp, cp, SP, CP kind, micro-batch, dtype, recomputed blocks)."""
    recomputed = plan.recomputed_blocks(work.layers)
    key = (
        "activations", plan.tp, plan.cp, plan.sp, plan.cp_kind, plan.micro_batch, plan.param_dtype, recomputed
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
            for lin in rows:
                nbytes = b * seq_tokens(lin.tokens) * lin.d_out * fa
                if plan.sp:
                    comm.add("tp", "reduce_scatter", nbytes, repeats)
                    comm.add("tp", "all_gather", nbytes, 1)
                else:
                    comm.add("tp", "all_reduce", nbytes, repeats)

    # context parallel, per self-attention call
    if plan.cp > 1:
        for layer in range(work.layers):
            repeats = 2 if layer < recomputed else 1
            for att in work.layer_items(layer)[2]:
                width = att.width // plan.tp
                if plan.cp_kind == "allgather_kv":
                    nbytes = b * s_pad * width * fa
                    comm.add("cp", "all_gather", nbytes, 2 * repeats)
                    comm.add("cp", "reduce_scatter", nbytes, 2)
                else:
                    nbytes = b * s_cp * width * fa
                    comm.add("cp", "all_to_all", nbytes, 4 * repeats + 4)
    return {(a, k): (v[0], v[1]) for a, kinds in comm.table.items() for k, v in kinds.items()}


def communication(work: Workload, plan: PlanPoint) -> dict:
    """Bytes and calls per mesh axis and kind for one optimizer step (rank 0)."""
    comm = _Comm()
    m = plan.accumulation
    for (axis, kind), (nbytes, calls) in _activation_collectives(work, plan).items():
        comm.add_total(axis, kind, nbytes * m, calls * m)
    if plan.tp > 1:
        # tp-partial gradients (every replicated parameter under SP, in-region ones always), once per step
        numel = tp_partial_rank0_numel(work, plan.tp, plan.fsdp if _uses_fsdp(plan) else 1, plan.sp)
        if numel:
            comm.add("tp", "all_reduce", numel * 4, 1)

    # FSDP: all-gather each unit before its forward (and again in backward if resharded), reduce-scatter
    # (and all-reduce across replicas) on every micro-batch or only the last one (`grad_sync`)
    if _uses_fsdp(plan):
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


def _uses_fsdp(plan: PlanPoint) -> bool:
    return plan.fsdp * plan.dp_replicate > 1


def state_memory(work: Workload, plan: PlanPoint, shard: int = 0) -> tuple[int, int, int]:
    """(param, grad, optimizer) bytes on rank 0 (or on the ranks of FSDP shard index `shard`): fp32 master
    params, the most gradient bytes held during a step (`gradient_bytes`), AdamW's two moments."""
    params = [p for blk in work.block_params for p in blk] + work.root_params
    n = plan.fsdp if _uses_fsdp(plan) else 1
    numel = _cached(work, ("state", plan.tp, n, shard), lambda: rank0_numel(params, plan.tp, n, shard))
    return numel * 4, gradient_bytes(work, plan, shard), 2 * numel * 4


def gradient_bytes(work: Workload, plan: PlanPoint, shard: int = 0) -> int:
    """The most gradient bytes rank 0 holds at once in a step (numel × element size of its tensors).

    Sharded fp32 gradients (rank 0's FSDP shard) when every micro-batch reduces. Under no-sync
    (`holds_unsharded_grads`) each unit keeps its whole tp-local gradient in the reduce dtype until the last
    micro-batch's backward reduces it; units are reduced in backward order (last block first, the root last)
    and each leaves its fp32 shard behind, so the peak is the largest total along that order.
    """
    n = plan.fsdp if _uses_fsdp(plan) else 1
    units = [*work.block_params, work.root_params]
    sharded = _cached(
        work, ("shard_units", plan.tp, n, shard), lambda: [rank0_numel(u, plan.tp, n, shard) for u in units]
    )
    if not plan.holds_unsharded_grads:
        return 4 * sum(sharded)
    full = _cached(
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


# ----------------------------------------------------------------------------------------------- compute


def flops_per_rank(work: Workload, plan: PlanPoint) -> tuple[float, float, float]:
    key = ("flops", plan.tp, plan.cp, plan.sp, plan.micro_batch * plan.accumulation)
    return _cached(work, key, lambda: _flops_per_rank(work, plan))


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


def _block_share(work: Workload, plan: PlanPoint) -> tuple[float, float]:
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


# ------------------------------------------------------------------------------------------ communication


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
        block_input = work.tokens * pad / (plan.cp * (plan.tp if plan.sp else 1)) * (work.hidden or 1) * fa
        kept += k * block_input + sum(blocks[k:]) + max(blocks[:k])
    else:
        kept += sum(blocks)
    return kept * plan.micro_batch, dup * plan.micro_batch


def fsdp_buffer_bytes(work: Workload, plan: PlanPoint) -> float:
    """FSDP's communication buffers at their peak: two gathered block units (current + prefetched) in the
    compute dtype, and one unit's unsharded gradient in the reduce dtype before its reduce-scatter."""
    blocks = work.block_params[0] if work.block_params else []
    unit = _cached(work, ("unit", plan.tp), lambda: sum(math.prod(local_shape(p, plan.tp)) for p in blocks))
    return unit * (2 * DTYPE_BYTES[plan.param_dtype] + DTYPE_BYTES[plan.reduce_dtype])


def step_cost(work: Workload, plan: PlanPoint, cluster: Cluster) -> Cost:
    """Bytes, memory, FLOPs and predicted step time of one optimizer step."""
    cost = Cost()
    cost.comm = communication(work, plan)
    cost.param_bytes, cost.grad_bytes, cost.optimizer_bytes = state_memory(work, plan)
    cost.activation_bytes, cost.duplicated_activation_bytes = activation_bytes(work, plan)
    cost.transient_bytes = fsdp_buffer_bytes(work, plan)
    mm, attn, model = flops_per_rank(work, plan)
    re_mm, re_attn = _block_share(work, plan)
    cost.model_flops_per_rank = model
    cost.hardware_flops_per_rank = model + re_mm + re_attn
    eff_mm = cluster.peak_flops * cluster.matmul_efficiency
    eff_attn = cluster.peak_flops * cluster.attention_efficiency
    cost.compute_s = (
        (mm + re_mm) / eff_mm + (attn + re_attn) / eff_attn + elementwise_seconds(work, plan, cluster)
    )
    overlappable = 0.0
    exposed = 0.0
    for axis, kinds in cost.comm.items():
        t_axis = 0.0
        for kind, v in kinds.items():
            t_axis += collective_seconds(kind, v["bytes"], v["calls"], axis, plan, cluster)
        cost.comm_s[axis] = t_axis
        if axis in ("dp_shard_cp", "dp_replicate"):
            overlappable += t_axis  # FSDP prefetches the next unit while this one computes
        else:
            exposed += t_axis  # TP/SP and CP collectives sit on the critical path in this engine
    # FSDP: each micro-batch's first all-gathers (the root, then block 0) and each gradient sync's last
    # reduce-scatters (block 0, then the root) cannot hide: two units' share of every micro-batch's gathers
    # and of every sync's reductions, i.e. 2/units of the step's FSDP traffic; the rest hides behind compute
    units = max(1, work.layers + 1)
    fsdp_edge = overlappable * 2 / units
    hidden_budget = cost.compute_s
    exposed += fsdp_edge + max(0.0, overlappable - fsdp_edge - hidden_budget)
    cost.exposed_comm_s = exposed
    cost.step_s = cost.compute_s + exposed
    return cost
