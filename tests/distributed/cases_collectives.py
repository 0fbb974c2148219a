"""Per-rank bodies of tests/distributed/test_collectives.py: each returns a list of failure strings."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from megagen.parallel.collectives import (
    all_gather_along,
    all_reduce_sum,
    all_to_all_along,
    reduce_scatter_along,
)

BASE = (3, 5, 7)  # odd sizes: only the split dim must divide the group


def _data(global_rank: int, shape, dtype=torch.float64) -> torch.Tensor:
    """Integer-valued, rank-dependent, so sums are exact whatever the reduction order."""
    n = 1
    for s in shape:
        n *= s
    return (torch.arange(n, dtype=dtype) * 3 + 1000 * global_rank).reshape(shape)


def _shape(dim: int, size: int) -> tuple[int, ...]:
    shape = list(BASE)
    shape[dim] = size
    return tuple(shape)


def _check(failures, what, got, want):
    if got.shape != want.shape or not torch.equal(got, want):
        failures.append(
            f"{what}: got {tuple(got.shape)} {got.flatten()[:6].tolist()}, "
            f"want {tuple(want.shape)} {want.flatten()[:6].tolist()}"
        )
    elif not got.is_contiguous():
        failures.append(f"{what}: result not contiguous")


def _run_all(group, members: list[int]) -> list[str]:
    """Check every collective on `group`, whose group rank i is global rank members[i]."""
    n = len(members)
    me = members.index(dist.get_rank())
    failures: list[str] = []
    for dim in (0, 1, 2, -1):
        xs = [_data(r, BASE) for r in members]
        got = all_gather_along(xs[me], dim, group)
        _check(failures, f"all_gather_along dim={dim}", got, torch.cat(xs, dim))
        # non-contiguous input
        xt = [x.transpose(0, 2) for x in xs]
        _check(
            failures,
            f"all_gather_along transposed dim={dim}",
            all_gather_along(xt[me], dim, group),
            torch.cat(xt, dim),
        )

        xs = [_data(r, _shape(dim, 2 * n)) for r in members]
        want = torch.stack(xs).sum(0).chunk(n, dim)[me]
        _check(failures, f"reduce_scatter_along dim={dim}", reduce_scatter_along(xs[me], dim, group), want)

        for gather_dim in (0, 1, 2):
            xs = [_data(r, _shape(dim, 3 * n)) for r in members]
            want = torch.cat([x.chunk(n, dim)[me] for x in xs], gather_dim)
            _check(
                failures,
                f"all_to_all_along scatter={dim} gather={gather_dim}",
                all_to_all_along(xs[me], dim, gather_dim, group),
                want,
            )

    xs = [_data(r, BASE) for r in members]
    x = xs[me].clone()
    got = all_reduce_sum(x, group)
    _check(failures, "all_reduce_sum", got, torch.stack(xs).sum(0))
    if not torch.equal(x, xs[me]):
        failures.append("all_reduce_sum modified its input")
    xi = [_data(r, (4, 6), torch.int64) for r in members]  # other dtypes go through unchanged
    _check(failures, "all_gather_along int64", all_gather_along(xi[me], 1, group), torch.cat(xi, 1))

    for fn, args in ((reduce_scatter_along, (1,)), (all_to_all_along, (1, 0))):
        try:
            fn(torch.ones(2, 2 * n + 1, 3), *args, group)
            failures.append(f"{fn.__name__}: no error for an indivisible size")
        except ValueError as exc:
            if str(2 * n + 1) not in str(exc):
                failures.append(f"{fn.__name__}: message lacks the size: {exc}")
    return failures


def world() -> list[str]:
    return _run_all(None, list(range(dist.get_world_size())))


def mesh_axes() -> dict[str, list[str]]:
    """On a 2x2 mesh: each axis' group, whose group ranks are not the global ranks for dp."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    out = {}
    for axis in ("dp", "tp"):
        group = mesh.get_group(axis)
        out[axis] = _run_all(group, dist.get_process_group_ranks(group))
    return out
