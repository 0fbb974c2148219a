"""Fixtures for multi-process (gloo) tests: one shared worker pool per world size for the whole session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:  # `tests.distributed.*` must import here and in the spawned workers
    sys.path.insert(0, _ROOT)

from tests.distributed.pool import DistributedPool  # noqa: E402

RECYCLE_AFTER = 12
"""Test cases served by one set of pool workers before they are replaced. Each training run builds a new
DeviceMesh whose gloo process groups live on (two threads each, some of them polling), so long-lived
workers slow down run after run; a restart costs a few seconds."""


@pytest.fixture(scope="session")
def dist_pool():
    """`dist_pool(4)` -> the session's DistributedPool of 4 gloo ranks (started on first use)."""
    pools: dict[int, DistributedPool] = {}
    uses: dict[int, int] = {}

    def get(world_size: int) -> DistributedPool:
        pool = pools.get(world_size)
        if pool is not None and uses.get(world_size, 0) >= RECYCLE_AFTER:
            pool.close()  # fresh workers: every run's mesh leaves gloo groups (and their threads) behind
            pool = None
        if pool is None:
            pool = pools[world_size] = DistributedPool(world_size)
            uses[world_size] = 0
        pool.start()  # no-op when running; a pool torn down by a failed call restarts in `run`
        uses[world_size] += 1
        return pool

    yield get
    for pool in pools.values():
        pool.close()
