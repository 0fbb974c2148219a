"""parallel/collectives.py against references computed from every rank's (reproducible) input."""

from __future__ import annotations

import pytest
import torch

from megagen.parallel.collectives import (
    all_gather_along,
    all_reduce_sum,
    all_to_all_along,
    group_size,
    reduce_scatter_along,
)

CASES = "tests.distributed.cases_collectives"


def test_single_process_is_identity():
    """Without a process group (or with one rank) every collective is a no-op."""
    x = torch.randn(2, 3, 4)
    assert group_size(None) == 1
    assert all_gather_along(x, 1, None) is x
    assert reduce_scatter_along(x, 2, None) is x
    assert all_reduce_sum(x, None) is x
    assert all_to_all_along(x, 0, 1, None) is x


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_collectives_on_world_group(dist_pool, world):
    for rank, failures in enumerate(dist_pool(world).run(f"{CASES}:world")):
        assert failures == [], f"rank {rank}"


@pytest.mark.slow
def test_collectives_on_mesh_axes(dist_pool):
    for rank, by_axis in enumerate(dist_pool(4).run(f"{CASES}:mesh_axes")):
        assert by_axis == {"dp": [], "tp": []}, f"rank {rank}"
