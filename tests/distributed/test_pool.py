"""tests/distributed/pool.py: results in rank order, remote errors named by rank, no hangs, restarts."""

from __future__ import annotations

import time

import pytest
import torch

from tests.distributed.pool import WorkerError

CASES = "tests.distributed.cases_pool"
pytestmark = pytest.mark.slow


def _pids(pool) -> list[int]:
    return [r["pid"] for r in pool.run(f"{CASES}:identity", value=0)]


def test_results_in_rank_order(dist_pool):
    pool = dist_pool(2)
    results = pool.run(f"{CASES}:identity", value={"a": [1, 2]})
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["world"] == 2 and r["value"] == {"a": [1, 2]} and r["rank_sum"] == 1.0 for r in results)
    assert all(r["threads"] == 1 for r in results)
    assert torch.equal(results[1]["tensor"], torch.ones(2))
    assert _pids(pool) == [r["pid"] for r in results]  # the same processes serve every call


def test_bad_target_is_rejected_in_parent(dist_pool):
    pool = dist_pool(2)
    starts = pool.starts
    with pytest.raises(ValueError, match="module:function"):
        pool.run("no_colon_here")
    assert pool.starts == starts and pool.alive


def test_exception_names_rank_and_pool_recovers(dist_pool):
    pool = dist_pool(2)
    old = _pids(pool)
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match="rank 1") as info:
        pool.run(f"{CASES}:fail_on", bad_rank=1, timeout=120)
    assert time.monotonic() - t0 < 30  # rank 0 was stuck in all_reduce: torn down, not waited for
    err = info.value
    assert err.rank == 1 and "ValueError: deliberate failure on rank 1" in str(err)
    assert "fail_on" in err.remote_traceback and "raise ValueError" in err.remote_traceback
    assert not pool.alive
    new = _pids(pool)  # transparently restarted
    assert new != old and len(new) == 2


def test_dead_worker_is_reported(dist_pool):
    pool = dist_pool(2)
    with pytest.raises(WorkerError, match="rank 0.*died \\(exit code 3\\)"):
        pool.run(f"{CASES}:die_on", bad_rank=0, timeout=120)
    assert [r["rank"] for r in pool.run(f"{CASES}:identity", value=1)] == [0, 1]


def test_hung_collective_times_out(dist_pool):
    pool = dist_pool(2)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"timed out after 3 s; ranks that never answered: \[1\]"):
        pool.run(f"{CASES}:hang_on", bad_rank=1, timeout=3)
    assert time.monotonic() - t0 < 20
    assert [r["rank"] for r in pool.run(f"{CASES}:identity", value=2)] == [0, 1]
