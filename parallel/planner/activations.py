"""Saved activations per rank, from what autograd really keeps in a one-sample meta-device forward.

Why: the activation peak decides micro-batch size and recompute, and a per-op formula drifts from the
model (a fused SwiGLU keeps three tensors, QK-norm two, adaLN a handful of per-sample vectors per block).
So the planner runs the model's forward once on the meta device with autograd on and records every
storage autograd saves: its bytes per sample, its block, where it is saved, and whether it spans the
sharded token sequence. A layout's share of each follows from the engine's rules, not from the model:

    between TP regions       sequence tensors / (cp · tp with SP, else cp); other tensors whole
    a region's own inputs    sequence tensors / cp (SP gathers tp's shards); the context whole
    inside a region          as its inputs, and the width / tp (they follow a column-parallel linear)
    attention cores          analytic: q, k, v, the fp32 log-sum-exp (and out for Ulysses, whose
                             reverse all-to-all gives the output projection its own copy)
    the objective            one fp32 tensor of the model output's size (the regression residual)

The meta device runs attention on the math path (which keeps S×S probabilities) where a GPU or CPU
kernel keeps only its inputs, output and log-sum-exp; that is why cores are modelled, not traced.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._pytree import tree_map

from megagen.parallel.fsdp import DTYPES

BETWEEN, REGION_INPUT, REGION = "between", "region_input", "region"


@dataclass(frozen=True)
class SavedTensor:
    """One storage autograd keeps for backward, for one sample."""

    layer: int | None  # block index, None outside the blocks (embeddings, final layer)
    place: str  # BETWEEN, REGION_INPUT or REGION
    sequence: bool  # spans the sharded token sequence
    numel: int
    fp32: bool  # kept in fp32 while the model computes in a lower precision


@dataclass(frozen=True)
class CoreCall:
    """One attention core call of one sample: q (q_tokens, heads, head_dim) against kv_tokens."""

    layer: int | None
    q_tokens: int
    kv_tokens: int
    heads: int
    head_dim: int
    self_attention: bool


@dataclass
class SavedProfile:
    """What one sample's forward keeps, traced at `dtype` (the config's compute dtype)."""

    tokens: int
    dtype: str
    tensors: list[SavedTensor] = field(default_factory=list)
    cores: list[CoreCall] = field(default_factory=list)


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _layer(name: str, blocks_prefix: str) -> int | None:
    if not name.startswith(blocks_prefix):
        return None
    return int(name[len(blocks_prefix) :].split(".", 1)[0])


def _is_core(name: str, module: nn.Module) -> bool:
    return name.endswith(".core") or type(module).__name__.endswith("Core")


class _Tracer:
    """Module-stack bookkeeping and the pack hook that classifies each saved storage."""

    def __init__(self, model: nn.Module, plan, tokens: int, low_precision: bool):
        self.plan, self.tokens, self.low_precision = plan, tokens, low_precision
        self.prefix = plan.blocks + "."
        self.stack: list[tuple[str, nn.Module]] = []
        self.region_inputs: list[set[int]] = []
        self.seen: set[int] = set()
        self.keep: list[torch.Tensor] = []  # hold saved tensors so no storage address is reused
        self.params = {_storage_key(p) for p in model.parameters()}
        self.profile = SavedProfile(tokens, "")

    def is_region(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.plan.regions)

    def enter(self, name: str, module: nn.Module, args, kwargs) -> None:
        self.stack.append((name, module))
        if self.is_region(name):
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            self.region_inputs.append({_storage_key(a) for a in tensors})
        if _is_core(name, module) and len(args) >= 2:
            q, k = args[0], args[1]
            self_attention = any(fnmatch.fnmatchcase(name, p) for p in self.plan.self_attention)
            layer = _layer(name, self.prefix)
            call = CoreCall(layer, q.shape[1], k.shape[1], q.shape[2], q.shape[3], self_attention)
            self.profile.cores.append(call)

    def leave(self, name: str) -> None:
        self.stack.pop()
        if self.is_region(name):
            self.region_inputs.pop()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key in self.seen or key in self.params or t.untyped_storage().nbytes() == 0:
            return t
        self.seen.add(key)
        self.keep.append(t)
        names = [n for n, _ in self.stack]
        if any(_is_core(n, m) for n, m in self.stack):
            return t  # modelled analytically
        layer = next((_layer(n, self.prefix) for n in reversed(names) if n.startswith(self.prefix)), None)
        place = BETWEEN
        if any(self.is_region(n) for n in names):
            place = REGION_INPUT if key in self.region_inputs[-1] else REGION
        sequence = self.tokens in tuple(t.shape[:2])
        fp32 = self.low_precision and t.dtype == torch.float32
        numel = t.untyped_storage().nbytes() // t.element_size()
        self.profile.tensors.append(SavedTensor(layer, place, sequence, numel, fp32))
        return t


def trace_saved(model: nn.Module, plan, inputs: dict, tokens: int, dtype: str) -> SavedProfile:
    """Run `model(**inputs)` (meta, batch 1) with autograd on at `dtype` and record what it saves."""
    torch_dtype = DTYPES[dtype]
    model = model.to(torch_dtype)
    inputs = tree_map(
        lambda v: v.to(torch_dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v, inputs
    )
    tracer = _Tracer(model, plan, tokens, torch_dtype != torch.float32)
    tracer.profile.dtype = dtype
    hooks = []
    for name, module in model.named_modules():
        hooks.append(
            module.register_forward_pre_hook(
                lambda m, a, kw, name=name: tracer.enter(name, m, a, kw), with_kwargs=True
            )
        )
        hooks.append(module.register_forward_hook(lambda m, a, o, name=name: tracer.leave(name)))
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(tracer.pack, lambda t: t):
            out = model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    if isinstance(out, torch.Tensor) and tokens in tuple(out.shape[:2]):
        # the training objective keeps one fp32 tensor of the output's size (the regression residual)
        tracer.profile.tensors.append(SavedTensor(None, BETWEEN, True, out.numel(), True))
    return tracer.profile


def between_share(plan, pad: float) -> float:
    """The share of a sequence tensor between TP regions one rank keeps: cp's chunk, and tp's with SP."""
    return pad / (plan.cp * (plan.tp if plan.sp else 1))


def _share(s: SavedTensor, plan, pad: float) -> float:
    """The fraction of a traced storage one rank of `plan` keeps."""
    if not s.sequence:
        return 1.0 / plan.tp if s.place == REGION else 1.0
    if s.place == BETWEEN:
        return between_share(plan, pad)
    return pad / plan.cp / (plan.tp if s.place == REGION else 1)


def _core_elements(c: CoreCall, plan, pad: float) -> tuple[float, float]:
    """(compute-dtype elements, fp32 elements) one rank keeps for one core call."""
    width = c.heads * c.head_dim
    if not c.self_attention:  # cross-attention: local queries against the whole context
        q = c.q_tokens * pad / plan.cp
        return (q + 2 * c.kv_tokens) * width / plan.tp, q * c.heads / plan.tp
    s = c.q_tokens * pad
    if plan.cp > 1 and plan.cp_kind == "ulysses":  # full sequence, heads over tp · cp; out copied back
        return 4 * s * width / (plan.tp * plan.cp), s * c.heads / (plan.tp * plan.cp)
    q = s / plan.cp
    return (q + 2 * s) * width / plan.tp, q * c.heads / plan.tp  # local q, gathered k and v


def saved_bytes_by_layer(profile: SavedProfile, plan, dtype_bytes: int, pad: float) -> tuple[dict, float]:
    """({layer or None: bytes per sample}, of which duplicated over tp) for one rank of `plan`."""
    by_layer: dict[int | None, float] = {}
    duplicated = 0.0
    for s in profile.tensors:
        nbytes = s.numel * _share(s, plan, pad) * (4 if s.fp32 else dtype_bytes)
        by_layer[s.layer] = by_layer.get(s.layer, 0.0) + nbytes
        if s.place == BETWEEN and s.sequence and not plan.sp and plan.tp > 1:
            duplicated += nbytes * (plan.tp - 1) / plan.tp
    for c in profile.cores:
        low, fp32 = _core_elements(c, plan, pad)
        by_layer[c.layer] = by_layer.get(c.layer, 0.0) + low * dtype_bytes + fp32 * 4
    return by_layer, duplicated
