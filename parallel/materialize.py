"""Give a model that was built and parallelised on the meta device memory for this rank's shards only,
and fill every shard from its tensor's full value, one tensor at a time.

`local_slice` is the one place that knows which part of a global tensor a rank holds: any mix of
`Shard`, FSDP2's `_StridedShard` (FSDP over a tensor-parallel dim) and `Replicate` placements on any mesh.
A sharded tensor's local piece is the product of one index set per tensor dim, and each set is what
`distribute_tensor` (without communication) gives for a 1-D range under the placements of that dim, so the
layout rules stay torch's.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor


def _shards_dim(placement, dim: int, ndim: int) -> bool:
    if not (isinstance(placement, Shard) or type(placement).__name__ == "_StridedShard"):
        return False
    return placement.dim % ndim == dim


def _on_dim0(placement):
    if type(placement).__name__ == "_StridedShard":
        return type(placement)(0, split_factor=placement.split_factor)
    return Shard(0)


def local_indices(size: int, dim: int, ndim: int, mesh, placements) -> torch.Tensor | None:
    """The global indices along tensor dim `dim` that this rank holds, in local order (None: all)."""
    per_axis = [_on_dim0(p) if _shards_dim(p, dim, ndim) else Replicate() for p in placements]
    if all(isinstance(p, Replicate) for p in per_axis):
        return None
    index = distribute_tensor(torch.arange(size), mesh, per_axis, src_data_rank=None)
    return index.to_local().cpu()


def local_slice(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of the global tensor `full`, laid out as `like` holds it (`full` itself unless
    `like` is a DTensor). A contiguous range of indices is a view of `full`, not a copy."""
    if not isinstance(like, DTensor):
        return full
    out = full
    for dim in range(full.dim()):
        index = local_indices(full.shape[dim], dim, full.dim(), like.device_mesh, like.placements)
        if index is None:
            continue
        start = int(index[0]) if len(index) else 0
        if torch.equal(index, torch.arange(start, start + len(index))):
            out = out.narrow(dim, start, len(index))
        else:
            out = out.index_select(dim, index)
    return out


def _runs(index: torch.Tensor) -> list[tuple[int, int, int]]:
    """(local start, global start, length) of each run of consecutive global indices."""
    runs, values = [], index.tolist()
    for pos, g in enumerate(values):
        if runs and g == runs[-1][1] + runs[-1][2]:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((pos, g, 1))
    return runs


def read_local(reader, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """This rank's part of a global tensor of `shape` that `reader[slices]` reads blocks of (e.g. a
    safetensors `get_slice`), laid out as `like` holds it: only the blocks this rank holds are read."""
    if not isinstance(like, DTensor) or not shape:
        return reader[tuple(slice(0, n) for n in shape)] if shape else reader[...]
    per_dim = []
    for dim, size in enumerate(shape):
        index = local_indices(size, dim, len(shape), like.device_mesh, like.placements)
        per_dim.append([(0, 0, size)] if index is None else _runs(index))
    blocks = list(itertools.product(*per_dim))
    if len(blocks) == 1:
        return reader[tuple(slice(g, g + n) for _, g, n in blocks[0])]
    out = None
    for block in blocks:
        part = reader[tuple(slice(g, g + n) for _, g, n in block)]
        if out is None:
            out = torch.empty([sum(n for _, _, n in runs) for runs in per_dim], dtype=part.dtype)
        out[tuple(slice(p, p + n) for p, _, n in block)] = part
    return out


def local_part(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def named_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer once, by its fully qualified name."""
    return [*model.named_parameters(), *model.named_buffers()]


@torch.no_grad()
def materialize(
    model: nn.Module,
    full_tensor: Callable[[str], torch.Tensor],
    device: torch.device,
    draw: Callable[[str, torch.Tensor], None] | None = None,
    draw_above: int = 2**20,
) -> None:
    """Allocate `model`'s meta tensors on `device` (local shards only) and fill each from
    `full_tensor(name)` (its global value on the CPU; asked for once per tensor, one at a time).

    `draw(name, local)`: fill tensors of more than `draw_above` elements in place without computing their
    full value (a rehearsal's shortcut: values then depend on the mesh, shapes and memory do not)."""
    model.to_empty(device=device)
    for name, t in named_tensors(model):
        if draw is not None and t.numel() > draw_above:
            draw(name, local_part(t))
        else:
            local_part(t).copy_(local_slice(full_tensor(name), t))
