"""Step watchdog: a step that runs past `train.step_timeout_s` says where this rank is stuck and exits.

A hung collective otherwise waits for NCCL's timeout (minutes, with no hint of which rank or which
collective). The watchdog thread prints the rank, the step, the collective in flight (from the
communication counter) and every thread's Python stack, then exits non-zero so torchrun's restart budget
takes over and the job resumes from its latest checkpoint.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time

EXIT_CODE = 86


class StepWatchdog:
    def __init__(self, timeout_s: float, rank: int, counter=None, poll_s: float = 0.2, exit_fn=None):
        self.timeout_s, self.rank, self.counter, self.poll_s = timeout_s, rank, counter, poll_s
        self.exit_fn = exit_fn or os._exit
        self._step: int | None = None
        self._started = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="megagen-step-watchdog", daemon=True)
        self._thread.start()

    def step_started(self, step: int) -> None:
        self._started = time.monotonic()
        self._step = step

    def step_finished(self) -> None:
        self._step = None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)

    def report(self) -> str:
        where = getattr(self.counter, "in_flight", None)
        inside = (
            f"inside collective {where}" if where else "not inside a collective (computing or loading data)"
        )
        return (
            f"megagen watchdog: rank {self.rank}: step {self._step} has run "
            f"{time.monotonic() - self._started:.1f}s "
            f"> train.step_timeout_s={self.timeout_s}; {inside}"
        )

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            step = self._step
            if step is None or time.monotonic() - self._started <= self.timeout_s:
                continue
            sys.stderr.write(self.report() + "\n")
            sys.stderr.flush()
            faulthandler.dump_traceback(all_threads=True)
            self.exit_fn(EXIT_CODE)
            return
