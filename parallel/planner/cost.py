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

    @property
    def world(self) -> int:
        return self.dp_replicate * self.dp_shard * self.cp * self.tp

    @property
    def fsdp(self) -> int:
        return self.dp_shard * self.cp

    @property
    def sp(self) -> bool:
        return self.sequence_parallel and self.tp > 1

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


def rank0_numel(params: list[ParamShape], tp: int, n: int) -> int:
    """Elements rank 0 holds: the first ceil(dim0/n) rows of each tp-local parameter."""
    total = 0
    for p in params:
        s = local_shape(p, tp)
        rows = s[0] if s else 1
        total += min(rows, -(-rows // n)) * _rest(s)
    return total


def communication(work: Workload, plan: PlanPoint) -> dict:
    """Bytes and calls per mesh axis and kind for one optimizer step (rank 0)."""
    comm = _Comm()
    fa = DTYPE_BYTES[plan.param_dtype]  # activations travel in the compute dtype
    b, m = plan.micro_batch, plan.accumulation
    s_pad = padded_tokens(work.tokens, plan)
    s_cp = s_pad // plan.cp
    recomputed = plan.recomputed_blocks(work.layers)

    def seq_tokens(tokens: int) -> int:
        """Per-rank tokens of a region input: the cp-local sequence, or unsharded (e.g. text) tokens."""
        return s_cp if tokens == work.tokens else tokens

    # tensor parallel, per micro-batch; forward collectives repeat for recomputed blocks
    if plan.tp > 1:
        for layer in range(work.layers):
            prefix = f"blocks.{layer}."
            repeats = 2 if layer < recomputed else 1
            regions = [r for r in work.regions if r.name.startswith(prefix)]
            rows = [lin for lin in work.linears if lin.style == "row" and lin.name.startswith(prefix)]
            for r in regions:
                for tokens, width in r.seq:
                    nbytes = b * seq_tokens(tokens) * width * fa
                    if plan.sp:
                        comm.add("tp", "all_gather", nbytes, m * repeats)
                        comm.add("tp", "reduce_scatter", nbytes, m)
                    else:
                        comm.add("tp", "all_reduce", nbytes, m)
                if not plan.sp:
                    for tokens, width in r.replicated:
                        comm.add("tp", "all_reduce", b * tokens * width * fa, m)
            for lin in rows:
                nbytes = b * seq_tokens(lin.tokens) * lin.d_out * fa
                if plan.sp:
                    comm.add("tp", "reduce_scatter", nbytes, m * repeats)
                    comm.add("tp", "all_gather", nbytes, m)
                else:
                    comm.add("tp", "all_reduce", nbytes, m * repeats)
        if plan.sp:  # partial gradients of tp-replicated parameters, summed once per step
            replicated = [p for blk in work.block_params for p in blk if p.tp_dim is None]
            replicated += [p for p in work.root_params if p.tp_dim is None]
            numel = (
                rank0_numel(replicated, plan.tp, plan.fsdp)
                if _uses_fsdp(plan)
                else sum(math.prod(p.shape) for p in replicated)
            )
            comm.add("tp", "all_reduce", numel * 4, 1)

    # context parallel, per self-attention call
    if plan.cp > 1:
        for att in work.attention:
            if not att.self_attention:
                continue
            layer = int(att.name.split(".")[1]) if att.name.startswith("blocks.") else 0
            repeats = 2 if layer < recomputed else 1
            width = att.width // plan.tp
            if plan.cp_kind == "allgather_kv":
                nbytes = b * s_pad * width * fa
                comm.add("cp", "all_gather", nbytes, 2 * m * repeats)
                comm.add("cp", "reduce_scatter", nbytes, 2 * m)
            else:
                nbytes = b * s_cp * width * fa
                comm.add("cp", "all_to_all", nbytes, 4 * m * repeats + 4 * m)

    # FSDP: all-gather each unit before its forward (and again in backward if resharded), reduce-scatter
    # (and all-reduce across replicas) once per step, on the last micro-batch
    if _uses_fsdp(plan):
        n = plan.fsdp
        units = [*work.block_params, work.root_params]
        pb, rb = DTYPE_BYTES[plan.param_dtype], DTYPE_BYTES[plan.reduce_dtype]
        for i, unit in enumerate(units):
            padded = fsdp_padded_numel(unit, plan.tp, n)
            is_root = i == len(units) - 1
            gathers = 1 if (is_root or not plan.reshard_after_forward) else 2
            if n > 1:
                comm.add("dp_shard_cp", "all_gather", padded * pb, m * gathers)
                comm.add("dp_shard_cp", "reduce_scatter", padded * rb, 1)
            if plan.dp_replicate > 1:
                comm.add("dp_replicate", "all_reduce", padded // n * rb, 1)

    comm.add("world", "all_reduce", 8, 2)  # grad-norm² and loss, float64
    return comm.as_dict()


def _uses_fsdp(plan: PlanPoint) -> bool:
    return plan.fsdp * plan.dp_replicate > 1


def state_memory(work: Workload, plan: PlanPoint) -> tuple[int, int, int]:
    """(param, grad, optimizer) bytes on rank 0: fp32 master params, fp32 grads, AdamW's two moments."""
    params = [p for blk in work.block_params for p in blk] + work.root_params
    n = plan.fsdp if _uses_fsdp(plan) else 1
    numel = rank0_numel(params, plan.tp, n)
    return numel * 4, numel * 4, 2 * numel * 4
