"""Step watchdog: a step that runs past its limit says where every rank is, then this rank exits (code 86).

A hung collective otherwise waits for the process group's timeout (10 to 30 minutes, with no hint of
which rank or which collective). On by default (`train.step_timeout_s=-1`, see `step_limit.py`).

Two daemon threads, neither on the training thread's path (a step costs it two clock reads):

* the timer polls the running step's age; past the limit it writes the report, every thread's Python
  stack, and exits with EXIT_CODE so torchrun's restart budget takes over and the job resumes from its
  latest checkpoint;
* the publisher keeps this rank's progress record (step, collectives issued per group) in the
  rendezvous store, at most every few seconds and only when it changed.

When the timer fires it asks c10d which collective this rank waits for (`parallel/progress.py`),
publishes that, waits up to `grace_s(limit)` for the other ranks to time out too, and reads the records
of the ranks in that collective's group: those that did not time out, or have not issued that
collective, are named (`watchdog_report.py`). It then stays until the ranks that timed out have written
their reports too (at least a grace, at most two): the first rank to exit makes torchrun stop the rest.
Store calls run in their own thread under deadlines — a stopped rank may host the store — so a rank
exits within `3 * grace_s(limit) + 2 * STORE_TIMEOUT_S + 2` seconds of its limit, typically two graces
(`STORE_TIMEOUT_S + 1` and a grace when the store does not answer at all).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import asdict

from megagen.parallel.progress_board import PeerView, ProgressBoard, exchange, wait_for_reports
from megagen.train.step_limit import StepTimeLimit
from megagen.train.watchdog_report import Groups, Store, build_report, ranks_concerned

log = logging.getLogger("megagen")

EXIT_CODE = 86
POLL_S = 0.2
STORE_TIMEOUT_S = 5.0


def publish_every_s(limit_s: float) -> float:
    return min(10.0, max(1.0, limit_s / 20))


def grace_s(limit_s: float) -> float:
    """How long a timed-out rank waits for the others' reports: live ranks stuck in the same step time
    out within a poll of each other, so this only delays the report when some rank is stuck."""
    return min(30.0, max(2.0, limit_s / 20))


def _in_torch(path: str) -> bool:
    return f"{os.sep}torch{os.sep}" in path or path.startswith("<")


def _frame_text(frame) -> str:
    return f"{_short(frame.f_code.co_filename)}:{frame.f_lineno} ({frame.f_code.co_name})"


def _short(path: str) -> str:
    for marker in ("site-packages/", "dist-packages/"):
        if marker in path:
            return path.split(marker, 1)[1]
    cwd = os.getcwd() + os.sep
    return path[len(cwd) :] if path.startswith(cwd) else path


class StepWatchdog:
    """`step_started(step)` / `step_finished()` around each step; `close()` at the end of the run."""

    def __init__(
        self,
        limit: StepTimeLimit | float,
        rank: int = 0,
        progress=None,
        board: ProgressBoard | None = None,
        world_size: int = 1,
        poll_s: float = POLL_S,
        exit_fn=None,
    ):
        """`progress`: a `parallel.progress.CollectiveProgress` (None: one process, no collectives);
        `board`: the peers' records (None: none to read)."""
        self.limit = limit if isinstance(limit, StepTimeLimit) else StepTimeLimit(float(limit))
        self.rank, self.progress, self.board, self.world_size = rank, progress, board, world_size
        self.poll_s = poll_s
        self.exit_fn = exit_fn or os._exit
        self._current: tuple[int, float, int] | None = None  # (step, start time, training thread id)
        self._stop = threading.Event()
        self._fired = False
        self._publishing = threading.Lock()  # held while a record goes out: the final one is not overwritten
        self._threads = [threading.Thread(target=self._watch, name="megagen-step-watchdog", daemon=True)]
        if board is not None and progress is not None:
            self._threads.append(threading.Thread(target=self._publish, name="megagen-progress", daemon=True))
        for thread in self._threads:
            thread.start()

    # ------------------------------------------------------------------ training thread
    def step_started(self, step: int) -> None:
        self._current = (step, time.monotonic(), threading.get_ident())  # one assignment: read atomically

    def step_finished(self) -> None:
        current, self._current = self._current, None
        if current is not None:
            self.limit.step_done(time.monotonic() - current[1])

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=1.0)

    # ------------------------------------------------------------------ records
    def record(self, state: str, step: int | None) -> dict:
        """This rank's progress record: what the peers' reports are built from."""
        return {
            "rank": self.rank,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "step": step,
            "state": state,
            "seq": self.progress.sequence_numbers() if self.progress is not None else {},
            "wall": time.time(),
        }

    def _where(self, thread_id: int) -> str | None:
        """The training thread's innermost Python frame and, when that is inside torch, the innermost
        frame outside it (megagen's or the caller's code)."""
        frame = sys._current_frames().get(thread_id)
        if frame is None:
            return None
        where = _frame_text(frame)
        caller = frame
        while caller is not None and _in_torch(caller.f_code.co_filename):
            caller = caller.f_back
        if caller is not None and caller is not frame:
            where += f" from {_frame_text(caller)}"
        return where

    def fire(self, step: int, started: float, thread_id: int | None = None) -> None:
        """Report where this rank and its peers are, then exit; every store call is bounded in time."""
        fired_at = time.monotonic()
        me = self.record("timed out", step)
        pending = self.progress.pending() if self.progress is not None else None
        me["pending"] = None if pending is None else [asdict(p) for p in pending]
        groups = Groups(self.progress.members, self.progress.axis_of) if self.progress is not None else None
        view = store = None
        grace = grace_s(self.limit.seconds())
        where = self._where(thread_id) if thread_id is not None else None
        if groups is not None and self.board is not None:
            timeout = self.board.timeout_s
            store = Store(self.board.address, self.board.host_rank, timeout, grace)
            view = PeerView()
            ranks = ranks_concerned(me, groups)
            _bounded(
                lambda: exchange(self.board, me, ranks, grace, view),
                view,
                fired_at + grace + 2 * timeout + 1,
                give_up=lambda: not view.answered and time.monotonic() - fired_at > timeout + 1,
            )
        limit = self.limit.describe()
        text = build_report(
            me, fired_at - started, limit, EXIT_CODE, groups, view, store, self.world_size, where, time.time()
        )
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
        faulthandler.dump_traceback(all_threads=True)
        if view is not None and view.answered:  # stay until the slower ranks have reported too
            _bounded(
                lambda: wait_for_reports(self.board, grace, 2 * grace),
                view,
                fired_at + 3 * grace + 2 * self.board.timeout_s + 1,
            )
        elif view is not None:  # no store to tell when they have: give them a grace all the same
            time.sleep(grace)
        self.exit_fn(EXIT_CODE)

    # ------------------------------------------------------------------ threads
    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            current = self._current
            if current is None or time.monotonic() - current[1] <= self.limit.seconds():
                continue
            locked = self._publishing.acquire(timeout=1.0)  # a hung publish must not hold the report up
            self._fired = True
            if locked:
                self._publishing.release()
            self.fire(*current)
            return

    def _publish(self) -> None:
        try:
            conn = self.board.connect()
        except (RuntimeError, OSError) as exc:
            log.warning("watchdog: cannot reach the rendezvous store (%s); peers will not see this rank", exc)
            return
        last, last_at = None, float("-inf")
        while not self._stop.wait(self.poll_s) and not self._fired:
            current = self._current
            record = self.record("in step" if current else "between steps", current[0] if current else None)
            key = (record["step"], sorted(record["seq"].items()))
            now = time.monotonic()
            if key == last or now - last_at < publish_every_s(self.limit.seconds()):
                continue
            with self._publishing:
                if self._fired:
                    return
                try:
                    conn.publish(record)
                except (RuntimeError, OSError) as exc:
                    log.debug("watchdog: publishing progress failed: %s", exc)
                    continue
            last, last_at = key, now


def _bounded(fn, view: PeerView, deadline: float, give_up=None) -> None:
    """Run `fn` (store calls) in a daemon thread until it returns, `deadline` (monotonic) passes or
    `give_up()` says so: a stopped store host makes calls hang past their own timeout."""

    def run():
        try:
            fn()
        except (RuntimeError, OSError, ValueError) as exc:  # the report says how far it got
            view.failed(exc)

    worker = threading.Thread(target=run, name="megagen-watchdog-store", daemon=True)
    worker.start()
    while worker.is_alive() and time.monotonic() < deadline and not (give_up and give_up()):
        worker.join(0.1)


def start_watchdog(cfg, runtime) -> StepWatchdog | None:
    """The watchdog `train.step_timeout_s` asks for (None when it is 0), watching this runtime's groups."""
    if cfg.train.step_timeout_s == 0:
        return None
    limit = StepTimeLimit(cfg.train.step_timeout_s)
    progress = runtime.collective_progress()
    board = ProgressBoard.for_default_group(STORE_TIMEOUT_S) if progress is not None else None
    return StepWatchdog(limit, runtime.rank, progress, board, runtime.world_size)
