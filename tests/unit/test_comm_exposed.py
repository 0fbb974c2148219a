"""parallel/comm.py exposed-time accounting, megagen/train/side_jobs.py's report of it and the
`exposed_comm_s` of `megagen bench` (megagen/metrics/bench.py), on a one-rank gloo group."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist

from megagen.metrics.bench import exposed_comm_per_axis
from megagen.parallel.collectives import Pending, all_reduce_sum_async
from megagen.parallel.comm import CommCounter, comm_axis
from megagen.train.side_jobs import CountCollectives, StepReport

F = torch.ops._c10d_functional


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def world_of_one():
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{_free_port()}")
    try:
        yield dist.group.WORLD.group_name
    finally:
        dist.destroy_process_group()


def test_functional_waits_are_timed_per_axis_and_kind(world_of_one):
    with CommCounter() as comm:
        with comm_axis("tp"):
            reduced = F.all_reduce(torch.ones(8), "sum", world_of_one)
        with comm_axis("cp"):
            gathered = F.all_gather_into_tensor(torch.ones(4), 1, world_of_one)
        F.wait_tensor(gathered)  # waited outside the scope: still charged to the axis it was issued on
        F.wait_tensor(reduced)
    timings = comm.exposed()
    assert set(timings) == {"tp", "cp"}
    assert set(timings["tp"]) == {"all_reduce"} and set(timings["cp"]) == {"all_gather"}
    for kinds in timings.values():
        for t in kinds.values():
            assert 0.0 < t["exposed_s"] <= t["issued_s"]  # blocked for at most the issue-to-done span
    by_axis = comm.exposed_by_axis()
    assert by_axis == {
        "tp": timings["tp"]["all_reduce"]["exposed_s"],
        "cp": timings["cp"]["all_gather"]["exposed_s"],
    }
    assert sum(by_axis.values()) <= comm.seconds + 1e-12


def test_c10d_collectives_have_unknown_exposed_time(world_of_one):
    """dist.* ops are waited on Work handles the dispatcher never sees: bytes count, time is None."""
    with CommCounter() as comm:
        with comm_axis("tp"):
            dist.all_reduce(torch.ones(3))
            F.wait_tensor(F.all_reduce(torch.ones(3), "sum", world_of_one))
        with comm_axis("cp"):
            F.wait_tensor(F.all_reduce(torch.ones(3), "sum", world_of_one))
    assert comm.summary() == {
        "tp": {"all_reduce": {"bytes": 24, "calls": 2}},
        "cp": {"all_reduce": {"bytes": 12, "calls": 1}},
    }
    assert comm.exposed()["tp"]["all_reduce"] == {"exposed_s": None, "issued_s": None}
    assert comm.exposed_by_axis()["tp"] is None and comm.exposed_by_axis()["cp"] > 0


def test_waits_on_collectives_issued_before_counting_are_not_attributed(world_of_one):
    early = F.all_reduce(torch.ones(2), "sum", world_of_one)
    with CommCounter() as comm:
        F.wait_tensor(early)
    assert comm.exposed() == {} and comm.summary() == {}
    comm.reset()
    assert comm.exposed_by_axis() == {} and comm.seconds == 0.0


def test_pending_waits_once_and_a_group_of_one_needs_no_wait():
    ready = all_reduce_sum_async(torch.ones(3))  # no process group: the sum is the input, already done
    assert torch.equal(ready.wait(), torch.ones(3))
    assert isinstance(ready, Pending) and ready.wait() is ready.wait()


def test_count_collectives_reports_exposed_seconds_per_axis(world_of_one):
    job = CountCollectives(CommCounter())
    job.before_step(0)
    with comm_axis("tp"):
        all_reduce_pending = Pending(F.all_reduce(torch.ones(4), "sum", world_of_one))
    all_reduce_pending.wait()
    report = StepReport(1, 0.0, 0.0, 0.0, 1.0, 0.0, 1, 1, {}, "b")
    job.after_step(report)
    assert set(report.metrics["comm_exposed_s"]) == {"tp"} and report.metrics["comm_exposed_s"]["tp"] > 0


def test_bench_exposed_comm_is_the_median_per_axis_and_none_when_unmeasurable():
    timed = [
        {"comm_exposed_s": {"tp": 0.1, "dp_shard_cp": None}},
        {"comm_exposed_s": {"tp": 0.3, "dp_shard_cp": None}},
        {"comm_exposed_s": {"tp": 0.2, "dp_shard_cp": None}},
    ]
    assert exposed_comm_per_axis(timed) == {"dp_shard_cp": None, "tp": 0.2}
    assert exposed_comm_per_axis([{}, {}]) == {}
