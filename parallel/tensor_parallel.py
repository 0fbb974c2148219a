"""Megatron-style tensor parallelism with optional sequence parallelism, applied from a plan.

Column-parallel linears keep their output features' shard, row-parallel ones their input features' shard;
weights become DTensors with their true placement on the tp mesh (FSDP2 and DCP see the global layout)
while compute runs on local shards. Each region module becomes a `TensorParallel<Module>` whose forward
first brings its declared inputs in (`RegionEntry`: all-gathered over tp under SP, else marked for a
backward all-reduce); row-parallel outputs are reduce-scattered (SP) or all-reduced. Which parameters
are left with tp-partial gradients (and summed by the runtime after backward) is the gradient rule of
`grad_reduction.py`.

The local GEMM is the replaced layer's own: a linear that carries a `gemm(x, weight, bias, amax_group=)`
(e.g. `megagen.kernels.Linear`, FP8 through Transformer Engine under `train.fp8`) keeps it, called on the
shard with `amax_group` = the tp group; a plain `nn.Linear` gets `F.linear`. The engine imports no kernel
or model code for this: the backend travels with the layer it replaces.
"""

from __future__ import annotations

import fnmatch
import inspect

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from megagen.parallel.class_swap import swap_in
from megagen.parallel.mappings import (
    copy_to_region,
    gather_along,
    reduce_from_region,
    reduce_scatter_along_dim,
)
from megagen.parallel.plan import ParallelPlan, TPRegion
from megagen.parallel.sp_local_first import gather_local_first, release
from megagen.parallel.sp_pipeline import run_in_pieces
from megagen.parallel.tp_overlap_schedule import local_first_pays, sp_pieces

SEQ_DIM = 1  # activations inside blocks are (batch, sequence, features)


def _local(p: torch.Tensor | None) -> torch.Tensor | None:
    return p.to_local() if isinstance(p, DTensor) else p


def _shard_param(p: torch.Tensor, mesh: DeviceMesh, dim: int) -> nn.Parameter:
    return nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(dim)], src_data_rank=None))


def plain_gemm(x: torch.Tensor, weight: torch.Tensor, bias=None, amax_group=None) -> torch.Tensor:
    """The GEMM of a linear that brings none of its own: F.linear (no FP8 scales to agree on)."""
    return F.linear(x, weight, bias)


def gemm_of(linear: nn.Linear):
    """The GEMM `linear` computes with (its `gemm`, else `plain_gemm`), for the wrapper that replaces it."""
    gemm = getattr(linear, "gemm", None)
    return gemm if callable(gemm) else plain_gemm


class ColumnParallelLinear(nn.Module):
    """y_local = x W_localᵀ: weight (and bias) split on output features over tp."""

    def __init__(self, linear: nn.Linear, mesh: DeviceMesh):
        super().__init__()
        tp = mesh.size()
        if linear.out_features % tp:
            raise ValueError(f"out_features {linear.out_features} not divisible by tp={tp}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = _shard_param(linear.weight, mesh, 0)
        self.bias = None if linear.bias is None else _shard_param(linear.bias, mesh, 0)
        self.group = mesh.get_group()
        self.gemm = gemm_of(linear)

    precomputed: tuple[torch.Tensor, torch.Tensor] | None = None
    """(input, output) computed ahead by a local-first region wrapper (`sp_local_first.py`): a call on
    exactly that input returns that output."""

    once: dict[int, tuple[torch.Tensor, torch.Tensor | None]] | None = None
    """While a region runs in pieces (`sp_pipeline.py`): id → (input, its output) for the inputs that are
    the same tensor in every piece (the replicated text context), so their GEMM runs once, not per piece."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.precomputed is not None and self.precomputed[0] is x:
            out, self.precomputed = self.precomputed[1], None
            return out
        kept = None if self.once is None else self.once.get(id(x))
        if kept is not None and kept[0] is x and kept[1] is not None:
            return kept[1]
        out = self.gemm(x, _local(self.weight), _local(self.bias), amax_group=self.group)
        if kept is not None and kept[0] is x:
            self.once[id(x)] = (x, out)
        return out


class RowParallelLinear(nn.Module):
    """y = Σ_tp x_local W_localᵀ: weight split on input features; output reduced over tp.

    With sequence parallelism the sum is a reduce-scatter over the sequence dim, so the output leaves the
    region sharded; otherwise an all-reduce. The bias (replicated) is added once, after the reduction.
    """

    def __init__(self, linear: nn.Linear, mesh: DeviceMesh, sequence_parallel: bool):
        super().__init__()
        tp = mesh.size()
        if linear.in_features % tp:
            raise ValueError(f"in_features {linear.in_features} not divisible by tp={tp}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = _shard_param(linear.weight, mesh, 1)
        self.bias = linear.bias
        self.group = mesh.get_group()
        self.sequence_parallel = sequence_parallel
        self.gemm = gemm_of(linear)

    deferred: torch.Tensor | None = None
    defer_sum = False
    """Set by a pipelining region wrapper (`sp_pipeline.py`) around its body: return the partial sum
    without bias, which the wrapper reduces piece by piece and then adds the bias to."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.gemm(x, _local(self.weight), None, amax_group=self.group)
        if self.defer_sum:
            self.deferred = y
            return y
        if self.sequence_parallel:
            y = reduce_scatter_along_dim(y, SEQ_DIM, self.group)
        else:
            y = reduce_from_region(y, self.group)
        return y if self.bias is None else y + self.bias


def _matching(model: nn.Module, patterns) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


class RegionEntry:
    """How the inputs of one tensor-parallel region enter it, by argument name: a sequence-sharded
    activation is all-gathered over tp under SP, else copied (identity forward, all-reduce backward); a
    replicated one (text context) is copied without SP and passed as is under SP, where its gradient stays
    partial like every replicated parameter's (the gradient rule of `grad_reduction.py`)."""

    row_output: RowParallelLinear | None = None
    """The region's one row-parallel linear when it is pipelined in sequence pieces (token-wise, SP,
    overlap on): its partial output is what the pieces reduce-scatter (`sp_pipeline.py`)."""

    columns: list[ColumnParallelLinear] = []
    """The region's column-parallel linears (set with `row_output`): their GEMMs on an input shared by
    all pieces run once per call (`ColumnParallelLinear.once`)."""
    local_first: list[ColumnParallelLinear] = []
    """The region's column-parallel linears, run on the local rows under the input's all-gather when
    the region is not token-wise (SP, overlap on; `sp_local_first.py`)."""

    def __init__(self, region: TPRegion, arg_names: list[str], group, sequence_parallel: bool):
        self.region, self.arg_names = region, arg_names
        self.group, self.sequence_parallel = group, sequence_parallel

    def __repr__(self) -> str:
        seq = "gather" if self.sequence_parallel else "copy"
        parts = [f"{n}: {seq}" for n in self.region.seq_args]
        parts += [
            f"{n}: {'as is' if self.sequence_parallel else 'copy'}" for n in self.region.replicated_args
        ]
        pipelined = ", sp_pipelined" if self.row_output is not None else ""
        pipelined += ", local_first" if self.local_first else ""
        return "tp_inputs=(" + ", ".join(parts) + ")" + pipelined

    def _enter(self, name: str, x):
        if not isinstance(x, torch.Tensor):
            return x
        if name in self.region.seq_args:
            return (
                gather_along(x, SEQ_DIM, self.group)
                if self.sequence_parallel
                else copy_to_region(x, self.group)
            )
        if name in self.region.replicated_args and not self.sequence_parallel:
            return copy_to_region(x, self.group)
        return x

    def prepare(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The region's call arguments with every declared input brought into the region."""
        args = (
            tuple(self._enter(name, x) for name, x in zip(self.arg_names, args)) + args[len(self.arg_names) :]
        )
        return args, {name: self._enter(name, x) for name, x in kwargs.items()}

    def _seq_inputs(self, args: tuple, kwargs: dict) -> dict:
        """The declared sequence inputs present in a call, keyed by position (int) or keyword (str)."""
        seq = self.region.seq_args
        found = {i: x for i, (name, x) in enumerate(zip(self.arg_names, args)) if name in seq}
        found.update({name: x for name, x in kwargs.items() if name in seq})
        return found

    def pieces(self, args: tuple, kwargs: dict) -> int:
        """How many sequence pieces this call runs in: 1 (the plain path) unless the region is pipelined,
        every sequence input is a tensor and `sp_pieces` finds a split that pays."""
        if self.row_output is None or torch.compiler.is_compiling():
            return 1
        inputs = list(self._seq_inputs(args, kwargs).values())
        if not inputs or not all(isinstance(x, torch.Tensor) and x.dim() >= 2 for x in inputs):
            return 1
        x = inputs[0]
        if any(t.shape[SEQ_DIM] != x.shape[SEQ_DIM] for t in inputs):
            return 1
        return sp_pieces(x.shape[SEQ_DIM], x.shape[-1], self.group.size())

    def run_pipelined(self, forward, args: tuple, kwargs: dict, pieces: int) -> torch.Tensor:
        """`forward` run piece by piece on the gathered sequence pieces, its row-parallel output reduced
        per piece (`sp_pipeline.run_in_pieces`); the bias is added once to the whole local shard."""
        linear = self.row_output
        args, kwargs = self.prepare_others(args, kwargs)

        def body(gathered: dict) -> torch.Tensor:
            a = tuple(gathered.get(i, x) for i, x in enumerate(args))
            k = {name: gathered.get(name, x) for name, x in kwargs.items()}
            linear.defer_sum = True
            try:
                out = forward(*a, **k)
            finally:
                linear.defer_sum = False
            partial, linear.deferred = linear.deferred, None
            if out is not partial:
                raise RuntimeError(
                    f"token_wise region {self.region} must return its row-parallel linear's output as is"
                )
            return out

        shared = [x for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor)]
        seq = self._seq_inputs(args, kwargs)
        shared = [x for x in shared if not any(x is t for t in seq.values())]
        for col in self.columns:
            col.once = {id(x): (x, None) for x in shared}
        try:
            out = run_in_pieces(body, seq, pieces, self.group)
        finally:
            for col in self.columns:
                col.once = None
        return out if linear.bias is None else out + linear.bias

    def local_first_input(self, args: tuple, kwargs: dict):
        """The key of the one sequence input when this call runs local-first (`sp_local_first.py`)."""
        if not self.local_first or torch.compiler.is_compiling():
            return None
        inputs = self._seq_inputs(args, kwargs)
        if len(inputs) != 1:
            return None
        key, x = next(iter(inputs.items()))
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            return None
        return key if local_first_pays(x.shape[SEQ_DIM], x.shape[-1], self.group.size()) else None

    def run_local_first(self, forward, args: tuple, kwargs: dict, key) -> torch.Tensor:
        """`forward` on the gathered input, its column-parallel GEMMs on that input done local rows first."""
        args, kwargs = self.prepare_others(args, kwargs)
        x = args[key] if isinstance(key, int) else kwargs[key]
        linears = [lin for lin in self.local_first if lin.in_features == x.shape[-1]]
        gathered = gather_local_first(x, linears, self.group)
        args = tuple(gathered if i == key else v for i, v in enumerate(args))
        kwargs = {name: gathered if name == key else v for name, v in kwargs.items()}
        try:
            return forward(*args, **kwargs)
        finally:
            release(linears, str(self.region))

    def prepare_others(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Every input but the sequence ones brought into the region (those enter piece by piece)."""
        seq = self.region.seq_args
        args = (
            tuple(x if name in seq else self._enter(name, x) for name, x in zip(self.arg_names, args))
            + args[len(self.arg_names) :]
        )
        return args, {name: x if name in seq else self._enter(name, x) for name, x in kwargs.items()}


class TensorParallelRegion:
    """Region wrapper (swapped in as a subclass, `class_swap.py`): the module's forward on its inputs
    brought into the region by its `region_entry`; parameter names are unchanged."""

    prefix = "TensorParallel"
    region_entry: RegionEntry

    def forward(self, *args, **kwargs):
        entry = self.region_entry
        pieces = entry.pieces(args, kwargs)
        if pieces > 1:
            return entry.run_pipelined(super().forward, args, kwargs, pieces)
        key = entry.local_first_input(args, kwargs)
        if key is not None:
            return entry.run_local_first(super().forward, args, kwargs, key)
        args, kwargs = entry.prepare(args, kwargs)
        return super().forward(*args, **kwargs)

    def extra_repr(self) -> str:
        inner = super().extra_repr()
        return repr(self.region_entry) + (f", {inner}" if inner else "")


def _row_output(name: str, module: nn.Module) -> RowParallelLinear:
    """The one row-parallel linear of a token-wise region, whose partial output its pieces reduce."""
    rows = [m for m in module.modules() if isinstance(m, RowParallelLinear)]
    if len(rows) != 1:
        raise ValueError(f"token_wise region {name} has {len(rows)} row-parallel linears; it needs exactly 1")
    return rows[0]


def apply_tensor_parallel(
    model: nn.Module, plan: ParallelPlan, mesh: DeviceMesh, sequence_parallel: bool, overlap: bool = False
) -> None:
    """Shard the plan's linears over tp; each region module becomes a `TensorParallel<Module>`, in place.
    With `overlap` (parallel.overlap) and SP, token-wise regions run pipelined in sequence pieces."""
    col = _matching(model, plan.colwise)
    row = _matching(model, plan.rowwise)
    for pattern in (*plan.colwise, *plan.rowwise):
        if not _matching(model, [pattern]):
            raise ValueError(f"parallel plan pattern {pattern!r} matches no module")
    for name, module in col:
        if not isinstance(module, nn.Linear):
            raise TypeError(f"colwise {name} is {type(module).__name__}, expected nn.Linear")
        _replace(model, name, ColumnParallelLinear(module, mesh))
    for name, module in row:
        if not isinstance(module, nn.Linear):
            raise TypeError(f"rowwise {name} is {type(module).__name__}, expected nn.Linear")
        _replace(model, name, RowParallelLinear(module, mesh, sequence_parallel))
    group = mesh.get_group()
    for pattern, region in plan.regions.items():
        hits = _matching(model, [pattern])
        if not hits:
            raise ValueError(f"parallel plan region {pattern!r} matches no module")
        for name, module in hits:
            names = list(inspect.signature(module.forward).parameters)  # positions of the declared inputs
            swap_in(module, TensorParallelRegion)
            module.region_entry = RegionEntry(region, names, group, sequence_parallel)
            cols = [m for m in module.modules() if isinstance(m, ColumnParallelLinear)]
            if sequence_parallel and overlap and region.token_wise:
                module.region_entry.row_output = _row_output(name, module)
                module.region_entry.columns = cols
            elif sequence_parallel and overlap:
                module.region_entry.local_first = cols
