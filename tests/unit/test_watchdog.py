"""The step watchdog: on by default, its time limit rule, the records it reads and the report it writes
(the hang itself: tests/distributed/test_watchdog_hang.py)."""

import json
import threading
import time

import pytest
import torch.distributed as dist

from megagen.config import Config, ConfigError, load_config
from megagen.parallel.progress import Pending, pending_in_dump
from megagen.parallel.progress_board import PeerView, ProgressBoard, exchange, wait_for_reports
from megagen.parallel.runtime import LocalRuntime
from megagen.train.step_limit import FLOOR_S, WARMUP_S, WARMUP_STEPS, StepTimeLimit
from megagen.train.watchdog import EXIT_CODE, StepWatchdog, grace_s, start_watchdog
from megagen.train.watchdog_report import Groups, Store, build_report, ranks_concerned


def _wait_for(exits, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not exits and time.monotonic() < deadline:
        time.sleep(0.05)


# ---------------------------------------- default


def test_the_watchdog_is_on_by_default_with_the_auto_rule():
    assert Config().train.step_timeout_s == -1.0
    dog = start_watchdog(Config(), LocalRuntime())
    try:
        assert dog is not None and dog.limit.auto and dog.limit.seconds() == WARMUP_S
    finally:
        dog.close()


def test_zero_turns_the_watchdog_off():
    assert start_watchdog(load_config(None, ["train.step_timeout_s=0"]), LocalRuntime()) is None


@pytest.mark.parametrize("value", ["-0.5", "-2"])
def test_a_negative_timeout_other_than_auto_is_refused(value):
    with pytest.raises(ConfigError, match=r"train\.step_timeout_s"):
        load_config(None, [f"train.step_timeout_s={value}"])


# ---------------------------------------- limit


def test_auto_limit_allows_slow_first_steps_then_follows_the_median():
    limit = StepTimeLimit(-1)
    for _ in range(WARMUP_STEPS):  # compile / first CUDA init: not counted
        assert limit.seconds() == WARMUP_S
        limit.step_done(1000.0)
    assert limit.seconds() == WARMUP_S and limit.median_s() is None
    for _ in range(5):
        limit.step_done(50.0)
    assert limit.seconds() == 20 * 50.0
    for _ in range(200):  # faster steps push the old ones out of the window
        limit.step_done(1.0)
    assert limit.median_s() == 1.0 and limit.seconds() == FLOOR_S
    assert "auto" in limit.describe() and "median step 1s" in limit.describe()


def test_fixed_limit_never_moves():
    limit = StepTimeLimit(5)
    for dt in (100.0, 0.1, 3.0, 3.0):
        limit.step_done(dt)
        assert limit.seconds() == 5
    assert limit.describe() == "5s (train.step_timeout_s=5)"


# ---------------------------------------- one process


def test_a_stuck_step_is_reported_and_exits(capfd):
    exits = []
    dog = StepWatchdog(0.2, rank=3, poll_s=0.05, exit_fn=exits.append)
    dog.step_started(7)
    _wait_for(exits)
    dog.close()
    assert exits == [EXIT_CODE]
    report = capfd.readouterr().err.splitlines()[0]
    assert report.startswith("megagen watchdog: rank 3: step 7 has run") and "exiting with code 86" in report
    assert "waiting at tests/unit/test_watchdog.py:" in report and "(_wait_for)" in report  # the sleep loop


def test_steps_within_the_timeout_pass():
    exits = []
    dog = StepWatchdog(0.5, rank=0, poll_s=0.05, exit_fn=exits.append)
    for step in range(3):
        dog.step_started(step)
        time.sleep(0.1)
        dog.step_finished()
    time.sleep(0.6)  # idle between steps never trips it
    dog.close()
    assert exits == []


# ---------------------------------------- flight recorder


def test_pending_collectives_come_from_the_flight_recorder_dump_oldest_first():
    entries = [
        {"record_id": 3, "process_group": ["7", "x"], "profiling_name": "nccl:_allgather_base",
         "collective_seq_id": 58, "retired": False, "state": "scheduled"},
        {"record_id": 1, "process_group": ["7", "x"], "profiling_name": "gloo:all_gather",
         "collective_seq_id": 56, "retired": True, "state": "scheduled"},
        {"record_id": 2, "process_group": ["7", "x"], "profiling_name": "gloo:reduce_scatter",
         "collective_seq_id": 57, "retired": False, "state": "scheduled"},
        {"record_id": 4, "process_group": ["9", "y"], "profiling_name": "nccl:send", "is_p2p": True,
         "p2p_seq_id": 4, "collective_seq_id": 0, "retired": False, "state": "started"},
        {"record_id": 5, "process_group": ["0", "d"], "profiling_name": "nccl:allreduce",
         "collective_seq_id": 3, "retired": False, "state": "completed"},
    ]  # fmt: skip
    pending = pending_in_dump(json.dumps({"entries": entries}), {"7": "dp_shard_cp", "0": "world"})
    assert pending == [
        Pending("reduce_scatter", "7", "dp_shard_cp", 57),
        Pending("all_gather", "7", "dp_shard_cp", 58),
        Pending("send", "9", "group 9", 4, p2p=True),
    ]
    assert pending[0].describe() == "reduce_scatter on dp_shard_cp #57"


# ---------------------------------------- report

GROUPS = Groups({"7": [0, 1], "0": [0, 1]}, {"7": "dp_shard_cp", "0": "world"})
STORE = Store("node0:29500", host_rank=0, timeout_s=5.0, grace_s=2.0)
NOW = 1000.0


def _me(rank=1, pending=({"kind": "all_gather", "group": "7", "axis": "dp_shard_cp", "seq": 57},)):
    return {
        "rank": rank,
        "step": 3,
        "seq": {"7": 58, "0": 12},
        "pending": None if pending is None else list(pending),
    }


def _report(me, view, store=STORE, world_size=2, where="fsdp.py:12 (wait)"):
    return build_report(
        me, 5.2, "5s (train.step_timeout_s=5)", EXIT_CODE, GROUPS, view, store, world_size, where, NOW
    )


def test_report_names_a_stopped_rank_and_where_it_was_last_seen():
    peer = {"rank": 0, "step": 3, "seq": {"7": 56, "0": 12}, "wall": NOW - 1.5}
    text = _report(_me(), PeerView(answered=True, arrived={1}, records={0: peer}))
    assert text == (
        "megagen watchdog: rank 1: step 3 has run 5.2s > 5s (train.step_timeout_s=5); blocked in all_gather "
        "on dp_shard_cp #57, waiting at fsdp.py:12 (wait); ranks not at this point: 0 (no report within 2s: "
        "stopped, hung or dead; last record 1.5s old: step 3, dp_shard_cp #56); exiting with code 86"
    )


def test_report_names_a_live_rank_that_has_not_issued_the_collective():
    peer = {"rank": 0, "step": 3, "seq": {"7": 56, "0": 12}, "wall": NOW,
            "pending": [{"kind": "all_reduce", "group": "0", "axis": "world", "seq": 12}]}  # fmt: skip
    text = _report(_me(), PeerView(answered=True, arrived={0, 1}, records={0: peer}))
    assert (
        "ranks not at this point: 0 (timed out in step 3 at dp_shard_cp #56 of #57, blocked in all_reduce "
        "on world #12)" in text
    )


def test_report_says_when_every_rank_reached_the_collective():
    peer = {"rank": 0, "step": 3, "seq": {"7": 57, "0": 12}, "wall": NOW}
    text = _report(_me(), PeerView(answered=True, arrived={0, 1}, records={0: peer}))
    assert "every other rank of dp_shard_cp reached this point and timed out too" in text
    assert "not at this point" not in text


def test_report_names_the_store_host_when_the_store_does_not_answer():
    text = _report(_me(), PeerView(answered=False))
    assert (
        "; ranks not at this point: 0 (it hosts the rendezvous store node0:29500, which did not answer "
        "within 5s: stopped, hung or dead); exiting with code 86"
    ) in text
    on_host = _report(_me(rank=0), PeerView(answered=False))  # the host itself cannot blame itself
    assert "peers' progress unavailable: the rendezvous store node0:29500 did not answer within 5s" in on_host
    agent = _report(_me(), PeerView(answered=False), Store("agent:1", None, 5.0, 2.0))
    assert "peers' progress unavailable" in agent and "not at this point" not in agent


def test_report_without_flight_recorder_or_pending_collective():
    peer = {"rank": 0, "step": 3, "seq": {"7": 58, "0": 11}, "wall": NOW}
    unknown = _report(_me(pending=None), PeerView(answered=True, arrived={0, 1}, records={0: peer}))
    assert "collective unknown (torch's flight recorder is off" in unknown
    assert (
        "ranks not at this point: 0 (timed out in step 3 at world #11 of #12, not in a collective)" in unknown
    )
    idle = _report(_me(pending=()), PeerView(answered=True, arrived={0, 1}, records={0: peer}))
    assert "not waiting for a collective (computing" in idle


def test_report_caps_the_ranks_it_names():
    groups = Groups({"0": list(range(20))}, {"0": "world"})
    me = {
        "rank": 0,
        "step": 1,
        "seq": {"0": 3},
        "pending": [{"kind": "all_reduce", "group": "0", "axis": "world", "seq": 3}],
    }
    text = build_report(me, 9.0, "5s", EXIT_CODE, groups, PeerView(True, {0}, {}), STORE, 20, None, NOW)
    assert "ranks not at this point: 1 (no report within 2s" in text and ", and 11 more" in text
    assert ranks_concerned(me, groups) == list(range(1, 20))


# ---------------------------------------- records


class _Progress:
    members = {"7": [0, 1]}
    axis_of = {"7": "dp_shard_cp"}

    def __init__(self):
        self.seq = 0

    def sequence_numbers(self):
        return {"7": self.seq}

    def pending(self):
        return [Pending("all_gather", "7", "dp_shard_cp", self.seq)]


def _board(store, rank, timeout_s=5.0, host_rank=None):
    return ProgressBoard(dist.PrefixStore("t", store), rank, 2, timeout_s, "mem", host_rank)


def test_records_are_published_and_a_stopped_peer_is_named(capfd):
    """Two ranks on one in-memory store: rank 1 publishes its progress then stops; rank 0's watchdog
    fires, waits for rank 1's report, reads its record and names it."""
    store = dist.HashStore()
    peer_progress = _Progress()
    peer_progress.seq = 56
    peer = StepWatchdog(60, 1, peer_progress, _board(store, 1), 2, poll_s=0.05, exit_fn=lambda code: None)
    peer.step_started(3)
    deadline = time.monotonic() + 10
    while not _board(store, 0).read([1]) and time.monotonic() < deadline:
        time.sleep(0.05)
    peer.close()  # "stopped": publishes nothing more, never reports
    record = _board(store, 0).read([1])[1]
    assert record["rank"] == 1 and record["step"] == 3 and record["seq"] == {"7": 56}
    assert record["state"] == "in step"
    exits = []
    me = _Progress()
    me.seq = 57
    dog = StepWatchdog(0.3, 0, me, _board(store, 0), 2, poll_s=0.05, exit_fn=exits.append)
    dog.step_started(3)
    _wait_for(exits)
    dog.close()
    assert exits == [EXIT_CODE]
    err = capfd.readouterr().err
    assert "rank 0: step 3" in err and "blocked in all_gather on dp_shard_cp #57" in err
    assert "ranks not at this point: 1 (no report within 2s: stopped, hung or dead; last record" in err
    assert "dp_shard_cp #56" in err
    assert _board(store, 1).arrivals() == {0}
    final = _board(store, 1).read([0])[0]
    assert final["state"] == "timed out" and final["pending"][0]["seq"] == 57


def test_exchange_ends_early_when_every_rank_has_timed_out():
    store = dist.HashStore()
    _board(store, 1).arrive()
    view = PeerView()
    started = time.monotonic()
    exchange(_board(store, 0), {"rank": 0, "step": 1, "seq": {}}, [1], grace_s=30.0, view=view, poll_s=0.05)
    assert time.monotonic() - started < 5 and view.arrived == {0, 1} and view.answered


class _HungStore:
    """A store whose host is stopped: writes vanish, reads never return."""

    def clone(self):
        return self

    def set_timeout(self, timeout):
        pass

    def set(self, key, value):
        pass

    def append(self, key, value):
        pass

    def add(self, key, amount):
        threading.Event().wait()

    check = get = add


def test_a_store_that_never_answers_cannot_hold_the_exit_up(capfd):
    exits = []
    board = ProgressBoard(_HungStore(), 1, 2, timeout_s=0.2, address="node0:29500", host_rank=0)
    dog = StepWatchdog(0.3, 1, _Progress(), board, 2, poll_s=0.05, exit_fn=exits.append)
    started = time.monotonic()
    dog.step_started(4)
    _wait_for(exits, timeout=20)
    took = time.monotonic() - started
    dog.close()
    assert exits == [EXIT_CODE]
    # watchdog.py's bound when the store never answers: its timeout + 1 s, then a grace; plus 1.5 s slack
    assert took < 0.3 + (0.2 + 1.0) + grace_s(0.3) + 1.5
    err = capfd.readouterr().err
    assert "ranks not at this point: 0 (it hosts the rendezvous store node0:29500" in err


def test_report_when_the_store_host_has_exited():
    view = PeerView(answered=False, lost="recvValue failed: Connection reset by peer")
    text = _report(_me(), view)
    assert (
        "; peers' progress unavailable: the rendezvous store node0:29500 (hosted by rank 0, which has "
        "exited) is gone: recvValue failed: Connection reset by peer; exiting" in text
    )
    assert "not at this point" not in text


def test_a_rank_stays_until_the_ranks_that_timed_out_have_reported():
    store = dist.HashStore()
    for rank in (0, 1):
        _board(store, rank).arrive()
    started = time.monotonic()
    waiter = threading.Thread(target=wait_for_reports, args=(_board(store, 0), 0.0, 30.0, 0.05))
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive()  # rank 1 timed out but has not reported yet
    _board(store, 1).reported()
    waiter.join(10)
    assert not waiter.is_alive() and time.monotonic() - started < 10
    alone = dist.HashStore()  # world of 2, only this rank timed out: waits min_s for a late one
    _board(alone, 0).arrive()
    started = time.monotonic()
    wait_for_reports(_board(alone, 0), 1.0, 30.0, 0.05)
    assert 1.0 <= time.monotonic() - started < 5
