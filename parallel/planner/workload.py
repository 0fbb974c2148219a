"""What one micro-batch of a model asks of the hardware, traced generically from a meta-device forward.

The planner knows no model: it runs the model's forward on the meta device (no memory, no compute) with
hooks that record every linear's tokens and features, every attention core's query/key lengths and width,
the inputs of each tensor-parallel region, and the parameter shapes of each FSDP unit. The ParallelPlan
says which linears are column/row parallel, which modules are regions and which cores are self-attention.
"""

from __future__ import annotations

import fnmatch
import inspect
from dataclasses import dataclass, field

import torch
from torch import nn

from megagen.parallel.grad_reduction import classify
from megagen.parallel.plan import ParallelPlan


@dataclass(frozen=True)
class LinearUse:
    """One linear applied in the forward of one sample: `tokens` rows of `d_in` → `d_out`."""

    name: str
    tokens: int
    d_in: int
    d_out: int
    style: str  # "col", "row" or "rep"
    in_block: bool


@dataclass(frozen=True)
class AttentionUse:
    """One attention core call for one sample: q_tokens × kv_tokens over `width` = heads × head_dim."""

    name: str
    q_tokens: int
    kv_tokens: int
    width: int
    self_attention: bool
    causal: bool = False
    """Causal masks halve the attention products (megagen's video/audio attention is bidirectional)."""


@dataclass(frozen=True)
class RegionUse:
    """One tensor-parallel region entry: (tokens, width) of its sequence args and of its replicated args."""

    name: str
    seq: tuple[tuple[int, int], ...]
    replicated: tuple[tuple[int, int], ...]
    token_wise: bool = False
    """Its `TPRegion.token_wise`: pipelined in sequence pieces under SP + overlap (else local-first)."""
    tables: tuple[tuple[int, int], ...] = ()
    """Sequence args with no batch dim and no gradient (e.g. rotary tables): (tokens, bytes per token).
    Gathered with the sequence under SP; nothing flows back."""


@dataclass(frozen=True)
class ParamShape:
    name: str
    shape: tuple[int, ...]
    tp_dim: int | None  # dim sharded over tp (0 = colwise weight/bias, 1 = rowwise weight), None = replicated
    grad_class: str = ""
    """Class under the gradient rule (`grad_reduction.py`); "" = sharded if tp_dim is set, else between."""


@dataclass
class Workload:
    """Per-sample traced structure of one model at one sequence length."""

    tokens: int
    """Sequence length of the sharded (video/audio) token sequence, unpadded."""
    layers: int
    linears: list[LinearUse] = field(default_factory=list)
    attention: list[AttentionUse] = field(default_factory=list)
    regions: list[RegionUse] = field(default_factory=list)
    block_params: list[list[ParamShape]] = field(default_factory=list)
    root_params: list[ParamShape] = field(default_factory=list)
    heads: int = 0
    hidden: int = 0
    """Model width: activations between blocks are (tokens, hidden)."""
    saved: object | None = None
    """What autograd keeps per sample (planner/activations.py `SavedProfile`); None = not traced."""
    norm_sums: list[tuple[str, int]] = field(default_factory=list)
    """(name, per-sample tokens) of each call of a `sharded_norms` module: its fp32 (tokens, 1) sum of
    squares is all-reduced over tp in forward and again in backward."""

    def layer_norm_sums(self, layer: int) -> list[int]:
        """Per-sample tokens of the sharded-norm calls of block `layer`."""
        return [t for name, t in self.norm_sums if name.startswith("blocks.") and _layer_of(name) == layer]

    def layer_items(self, layer: int) -> tuple[list[RegionUse], list[LinearUse], list[AttentionUse]]:
        """(regions, row-parallel linears, self-attention calls) of block `layer` (cached)."""
        cache = self.__dict__.setdefault("_by_layer", {})
        if not cache:
            for i in range(self.layers):
                cache[i] = ([], [], [])
            for r in self.regions:
                cache[_layer_of(r.name)][0].append(r)
            for lin in self.linears:
                if lin.style == "row" and lin.in_block:
                    cache[_layer_of(lin.name)][1].append(lin)
            for att in self.attention:
                if att.self_attention and att.name.startswith("blocks."):
                    cache[_layer_of(att.name)][2].append(att)
        return cache[layer]

    @property
    def num_params(self) -> int:
        shapes = [p.shape for b in self.block_params for p in b] + [p.shape for p in self.root_params]
        total = 0
        for s in shapes:
            n = 1
            for d in s:
                n *= d
            total += n
        return total


def _layer_of(name: str) -> int:
    """Index of the block a traced name belongs to (`<blocks>.<i>.…`)."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return 0


def _match(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _per_sample_tokens(x: torch.Tensor, batch: int) -> int:
    n = 1
    for d in x.shape[:-1]:
        n *= d
    return n // batch


def _linear_tracer(work: Workload, name: str, style: str, in_block: bool, batch: int):
    def on_linear(mod, args, out):
        tokens = _per_sample_tokens(args[0], batch)
        work.linears.append(LinearUse(name, tokens, mod.in_features, mod.out_features, style, in_block))

    return on_linear


def _core_tracer(work: Workload, name: str, is_self: bool):
    def on_core(mod, args, out):
        q, k = args[0], args[1]
        work.attention.append(AttentionUse(name, q.shape[1], k.shape[1], q.shape[2] * q.shape[3], is_self))

    return on_core


def _is_table(x: torch.Tensor, batch: int) -> bool:
    """A sequence arg without gradient whose leading dim is not the batch (e.g. (2, S, d) rotary tables)."""
    return not x.requires_grad and (x.dim() < 3 or x.shape[0] != batch)


def _region_tracer(work: Workload, name: str, region, arg_names: list[str], batch: int):
    def on_region(mod, args, kwargs):
        bound = dict(zip(arg_names, args))
        bound.update(kwargs)
        present = [bound[a] for a in region.seq_args if isinstance(bound.get(a), torch.Tensor)]
        seq = tuple((_per_sample_tokens(x, batch), x.shape[-1]) for x in present if not _is_table(x, batch))
        tables = tuple(
            (x.shape[1], x.numel() // x.shape[1] * x.element_size()) for x in present if _is_table(x, batch)
        )
        rep = tuple(
            (_per_sample_tokens(bound[a], batch), bound[a].shape[-1])
            for a in region.replicated_args
            if isinstance(bound.get(a), torch.Tensor)
        )
        work.regions.append(RegionUse(name, seq, rep, region.token_wise, tables))

    return on_region


def _norm_tracer(work: Workload, name: str, batch: int):
    def on_norm(mod, args, out):
        work.norm_sums.append((name, _per_sample_tokens(args[0], batch)))

    return on_norm


def _install_tracers(model: nn.Module, plan: ParallelPlan, work: Workload, batch: int) -> list:
    """Observation hooks on every linear, attention core and region; returns their handles."""
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            style = "col" if _match(name, plan.colwise) else "row" if _match(name, plan.rowwise) else "rep"
            in_block = name.startswith(plan.blocks + ".")
            hooks.append(module.register_forward_hook(_linear_tracer(work, name, style, in_block, batch)))
        elif _match(name, plan.sharded_norms):
            hooks.append(module.register_forward_hook(_norm_tracer(work, name, batch)))
        elif name.endswith(".core") or type(module).__name__.endswith("Core"):
            tracer = _core_tracer(work, name, _match(name, plan.self_attention))
            hooks.append(module.register_forward_hook(tracer))
        for pattern, region in plan.regions.items():
            if fnmatch.fnmatchcase(name, pattern):
                arg_names = list(inspect.signature(module.forward).parameters)
                tracer = _region_tracer(work, name, region, arg_names, batch)
                hooks.append(module.register_forward_pre_hook(tracer, with_kwargs=True))
    return hooks


def _record_params(model: nn.Module, plan: ParallelPlan, work: Workload) -> None:
    """Each block's parameter shapes (an FSDP unit each), then the root's, with their tp dim and class."""
    classes = classify(model, plan)[0]
    block_ids = set()
    for i, block in enumerate(model.get_submodule(plan.blocks)):
        shapes = []
        for pname, p in block.named_parameters():
            full = f"{plan.blocks}.{i}.{pname}"
            shapes.append(ParamShape(full, tuple(p.shape), _tp_dim(full, plan), classes.get(full, "")))
            block_ids.add(id(p))
        work.block_params.append(shapes)
    for pname, p in model.named_parameters():
        if id(p) not in block_ids:
            shape = ParamShape(pname, tuple(p.shape), _tp_dim(pname, plan), classes.get(pname, ""))
            work.root_params.append(shape)


def trace_workload(model: nn.Module, plan: ParallelPlan, inputs: dict, batch: int) -> Workload:
    """Run `model(**inputs)` (meta tensors, batch size `batch`) and record what it does per sample."""
    seq_name = next(iter(plan.sequence_inputs))
    seq_dim = plan.sequence_inputs[seq_name]
    work = Workload(tokens=int(inputs[seq_name].shape[seq_dim]), layers=len(model.get_submodule(plan.blocks)))
    hooks = _install_tracers(model, plan, work, batch)
    try:
        with torch.enable_grad():  # on meta: free, and tells activations (gradient) from tables (none)
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    _record_params(model, plan, work)
    work.heads = max(plan.head_counts.values()) if plan.head_counts else 0
    work.hidden = max((r.seq[0][1] for r in work.regions if r.seq), default=0)
    return work


def _tp_dim(param_name: str, plan: ParallelPlan) -> int | None:
    module, _, leaf = param_name.rpartition(".")
    if _match(module, plan.colwise) or _match(module, plan.sharded_norms):
        return 0
    if _match(module, plan.rowwise):
        return 1 if leaf == "weight" else None
    return None


def cached(work: Workload, key: tuple, compute):
    """`compute()` once per (workload, key): the search costs thousands of plans on one workload."""
    cache = work.__dict__.setdefault("_cost_cache", {})
    if key not in cache:
        cache[key] = compute()
    return cache[key]
