"""A SIGSTOPped rank of a 2-rank torchrun job: the live rank's watchdog exits with code 86 within the
timeout plus a bounded margin, naming the stopped rank and the collective it is blocked in; nothing of
the job is left running afterwards.

Rank 1 stopped: the live rank 0 reads its peer's progress record from the rendezvous store. Rank 0
stopped: rank 0 also hosts that store (our launchers' private store), so the live rank 1 must name it
from a store that no longer answers.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from megagen.train.watchdog import STORE_TIMEOUT_S, grace_s
from tests.distributed.torchrun import start_torchrun

pytestmark = pytest.mark.slow

TIMEOUT_S = 5
# The bound megagen/train/watchdog.py documents (3 graces of 2 s at this timeout, 2 store timeouts, 2 s),
# plus 5 s for a loaded 2-core machine; typically a rank exits 2 graces after its limit.
MARGIN_S = 3 * grace_s(TIMEOUT_S) + 2 * STORE_TIMEOUT_S + 2 + 5


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        kids = _children(todo.pop())
        found += kids
        todo += kids
    return found


def _alive(pid: int) -> bool:
    """Running or stopped (a zombie has exited; its parent has not reaped it yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def _wait(condition, timeout: float, what: str, job=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if job is not None and job.poll() is not None:
            raise AssertionError(f"the job ended (code {job.returncode}) while waiting for {what}")
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _workers(agent_pid: int) -> dict[int, int] | None:
    ranks = {_rank_of(pid): pid for pid in _children(agent_pid)}
    ranks.pop(None, None)
    return ranks if len(ranks) == 2 else None


def _steps_logged(path: Path) -> int:
    try:
        return len([json.loads(line) for line in path.read_text().splitlines()])
    except (OSError, ValueError):
        return 0


@pytest.mark.parametrize("stopped", [1, 0])
def test_a_stopped_rank_is_named_and_the_live_rank_exits(tmp_path, stopped):
    live = 1 - stopped
    out_path, err_path = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = start_torchrun(
            [
                "train",
                "examples/configs/video_tiny.yaml",
                "train.steps=100000",  # still training when the rank is stopped
                "train.micro_batch_size=4",
                f"train.step_timeout_s={TIMEOUT_S}",
                "metrics.tensorboard=false",
                "metrics.progress=none",
                f"run.dir={tmp_path / 'run'}",
            ],
            out,
            err,
            ("--standalone", "--monitor-interval", "0.2"),
        )
    family: list[int] = []
    try:
        workers = _wait(lambda: _workers(proc.pid), 120, "two worker processes", proc)
        _wait(lambda: _steps_logged(tmp_path / "run" / "metrics.jsonl") >= 3, 180, "3 logged steps", proc)
        family = _descendants(proc.pid)
        os.kill(workers[stopped], signal.SIGSTOP)
        stopped_at = time.monotonic()
        _wait(lambda: not _alive(workers[live]), TIMEOUT_S + MARGIN_S, f"rank {live} to exit")
        exited_after = time.monotonic() - stopped_at
        os.kill(workers[stopped], signal.SIGKILL)
        assert proc.wait(timeout=60) != 0
        _wait(lambda: not any(_alive(pid) for pid in family), 30, "every process of the job to end")
    finally:
        for pid in [*family, proc.pid]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)
    log = err_path.read_text() + out_path.read_text()
    print(log[-6000:])  # shown when the test fails
    assert exited_after <= TIMEOUT_S + MARGIN_S, exited_after
    print(f"rank {live} exited {exited_after:.1f}s after rank {stopped} was stopped")
    report = [line for line in log.splitlines() if line.startswith(f"megagen watchdog: rank {live}:")]
    assert report, log[-4000:]
    assert re.search(rf"ranks not at this point: {stopped} \(", report[0]), report[0]
    assert re.search(r"blocked in \w+ on \w+ #\d+", report[0]), report[0]
    assert re.search(r"exitcode\s*:\s*86", log), log[-4000:]
