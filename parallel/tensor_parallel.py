"""Megatron-style tensor parallelism with optional sequence parallelism, applied from a plan.

Column-parallel linears keep their output features' shard, row-parallel ones their input features' shard;
weights become DTensors with their true placement on the tp mesh (FSDP2 and DCP see the global layout)
while compute runs on local shards. Each region module becomes a `TensorParallel<Module>` whose forward
first brings its declared inputs in (`region_entry.py`: all-gathered over tp under SP, else marked for a
backward all-reduce); row-parallel outputs are reduce-scattered (SP) or all-reduced. Under SP with
parallel.overlap the entry overlaps those collectives with the region's GEMMs (`region_overlap.py`).
Which parameters are left with tp-partial gradients (and summed by the runtime after backward) is the
gradient rule of `grad_reduction.py`.

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
from megagen.parallel.mappings import reduce_from_region, reduce_scatter_along_dim
from megagen.parallel.plan import ParallelPlan
from megagen.parallel.region_entry import SEQ_DIM, RegionEntry
from megagen.parallel.region_overlap import OverlappedRegionEntry


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


class TensorParallelRegion:
    """Region wrapper (swapped in as a subclass, `class_swap.py`): the module's forward on its inputs
    brought into the region by its `region_entry`; parameter names are unchanged."""

    prefix = "TensorParallel"
    region_entry: RegionEntry

    def forward(self, *args, **kwargs):
        return self.region_entry.run(super().forward, args, kwargs)

    def extra_repr(self) -> str:
        inner = super().extra_repr()
        return repr(self.region_entry) + (f", {inner}" if inner else "")


def _row_output(name: str, module: nn.Module) -> RowParallelLinear:
    """The one row-parallel linear of a token-wise region, whose partial output its pieces reduce."""
    rows = [m for m in module.modules() if isinstance(m, RowParallelLinear)]
    if len(rows) != 1:
        raise ValueError(f"token_wise region {name} has {len(rows)} row-parallel linears; it needs exactly 1")
    return rows[0]


def _entry(name: str, module: nn.Module, region, names: list[str], group, sp: bool, overlap: bool):
    """The region's `RegionEntry`; under SP with overlap, one that overlaps (`region_overlap.py`)."""
    if not (sp and overlap):
        return RegionEntry(region, names, group, sp)
    row = _row_output(name, module) if region.token_wise else None
    cols = [m for m in module.modules() if isinstance(m, ColumnParallelLinear)]
    return OverlappedRegionEntry(region, names, group, sp, row_output=row, columns=cols)


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
            module.region_entry = _entry(name, module, region, names, group, sequence_parallel, overlap)
