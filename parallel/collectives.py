"""Raw collectives along a tensor dimension over a process group (no autograd).

The engine's autograd functions (Megatron-style pairs: all-gather / reduce-scatter, all-to-all / its
inverse) are built on these. Every function communicates a contiguous buffer laid out so that the chunk of
rank j is the j-th block of dim 0, which is what `all_gather_single` / `reduce_scatter_single` /
`all_to_all_single` exchange; the result comes back contiguous in the caller's layout. The same code runs
on gloo (CPU) and NCCL (CUDA).

With a group of one rank (or no initialised process group) every function is a no-op that may return its
input itself. Sizes that do not split evenly raise ValueError with the numbers.

Every wait goes through `_wait` (or `Pending.wait`, which calls it): `wait_tensor` is where the
communication accounting (`parallel/comm.py`) times exposed communication, so overlapping code issues
early, holds a `Pending`, and waits where the result is needed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megagen.parallel.comm import comm_as

__all__ = [
    "group_size",
    "all_gather_along",
    "reduce_scatter_along",
    "all_reduce_sum",
    "all_to_all_along",
    "all_reduce_sum_async",
    "issue_all_gather",
    "Pending",
]

# Functional (out-of-place) collectives: selective activation checkpointing can keep their outputs instead
# of repeating the communication in backward (in-place c10d ops mutate buffers it would have cached).
_F = torch.ops._c10d_functional


def _name(group: dist.ProcessGroup | None) -> str:
    return (group or dist.group.WORLD).group_name


def issue_all_gather(x: torch.Tensor, n: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Issue the all-gather of x over `group` and return its pending result (n·rows, ...), block j from
    rank j; the caller computes meanwhile and waits it with `_wait`.

    CPU tensors (gloo) travel as an all-to-all that sends x to every rank: the same bytes and the same
    result, counted as an all_gather. Why: torch's gloo all-gather corrupts the heap (or loses a message
    and hangs) when more than one is in flight on a group, which the overlapped paths need; its
    all-to-all, reduce-scatter and all-reduce do not. tests/distributed/test_inflight_collectives.py
    keeps several in flight and checks every result.
    """
    x = x.contiguous()
    if x.device.type != "cpu":
        return _F.all_gather_into_tensor(x, n, _name(group))
    rows = x.shape[0]
    to_every_rank = x.repeat(n, *([1] * (x.dim() - 1)))
    with comm_as("all_gather"):
        return _F.all_to_all_single(to_every_rank, [rows] * n, [rows] * n, _name(group))


def _wait(t: torch.Tensor) -> torch.Tensor:
    """Block until the functional collective producing `t` is done (timed as exposed by CommCounter)."""
    return _F.wait_tensor(t)


class Pending:
    """An issued collective whose result is not needed yet: `wait()` blocks once and returns it, so the
    compute between issue and wait hides the communication."""

    def __init__(self, result: torch.Tensor, done: bool = False):
        self._result, self._done = result, done

    def wait(self) -> torch.Tensor:
        if not self._done:
            self._result, self._done = _wait(self._result), True
        return self._result


def group_size(group: dist.ProcessGroup | None) -> int:
    """Number of ranks in `group` (the default group when None); 1 when torch.distributed is not running."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _split_size(x: torch.Tensor, dim: int, n: int, what: str) -> int:
    size = x.shape[dim]
    if size % n:
        raise ValueError(
            f"{what}: dim {dim} of shape {tuple(x.shape)} has size {size}, not divisible by "
            f"the group size {n}"
        )
    return size // n


def _chunks_first(x: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    """(..., n*c, ...) -> contiguous (n, ..., c, ...): the j-th chunk along `dim` becomes block j of dim 0."""
    return x.unflatten(dim, (n, x.shape[dim] // n)).movedim(dim, 0).contiguous()  # a view when dim == 0


def _blocks_into(y: torch.Tensor, dim: int) -> torch.Tensor:
    """(n, ..., c, ...) -> contiguous (..., n*c, ...): concatenate the dim-0 blocks along `dim`."""
    if dim == 0:
        return y.flatten(0, 1)
    return y.movedim(0, dim).flatten(dim, dim + 1).contiguous()


def all_gather_along(x: torch.Tensor, dim: int, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Concatenate every rank's `x` (same shape everywhere) along `dim`, in rank order."""
    n = group_size(group)
    if n == 1:
        return x
    dim = dim % x.dim()
    x = x.contiguous()
    # Concatenation form (n * d0, ...): rank j's rows are block j of dim 0.
    out = _wait(_F.all_gather_into_tensor(x, n, _name(group)))
    return _blocks_into(out.view(n, *x.shape), dim)


def reduce_scatter_along(x: torch.Tensor, dim: int, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum `x` over the group and keep this rank's chunk along `dim` (chunk r of n equal chunks)."""
    n = group_size(group)
    if n == 1:
        return x
    dim = dim % x.dim()
    c = _split_size(x, dim, n, "reduce_scatter_along")
    out_shape = list(x.shape)
    out_shape[dim] = c
    # (n * out_shape[0], ...) contiguous, block j of dim 0 for rank j (concatenation form, as for gather).
    inp = _chunks_first(x, dim, n).flatten(0, 1)
    out = _wait(_F.reduce_scatter_tensor(inp, "sum", n, _name(group)))
    return out.view(out_shape)  # each block of `inp` is laid out exactly like the output


def all_reduce_sum(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum of `x` over the group, in a new tensor (`x` is left untouched)."""
    if group_size(group) == 1:
        return x
    return _wait(_F.all_reduce(x.contiguous(), "sum", _name(group)))


def all_reduce_sum_async(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> Pending:
    """Issue the sum of `x` over the group (into a new tensor) and return at once; `.wait()` gives it."""
    if group_size(group) == 1:
        return Pending(x, done=True)
    return Pending(_F.all_reduce(x.contiguous(), "sum", _name(group)))


def all_to_all_along(
    x: torch.Tensor, scatter_dim: int, gather_dim: int, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Split `x` into n chunks along `scatter_dim`, send chunk j to rank j, and concatenate the chunks
    received from ranks 0..n-1 along `gather_dim` (Ulysses: scatter heads, gather sequence, and back)."""
    n = group_size(group)
    if n == 1:
        return x
    scatter_dim, gather_dim = scatter_dim % x.dim(), gather_dim % x.dim()
    _split_size(x, scatter_dim, n, "all_to_all_along")
    inp = _chunks_first(x, scatter_dim, n)  # (n, *chunk_shape)
    rows = [inp.shape[1]] * n
    flat = inp.flatten(0, 1)
    out = _wait(_F.all_to_all_single(flat, rows, rows, _name(group)))  # block j = what rank j sent us
    return _blocks_into(out.view(inp.shape), gather_dim)
