"""How long a step may run before the watchdog fires: `train.step_timeout_s` as a rule.

A fixed number of seconds, or (the default, -1) a limit derived from this run's own step times: the first
steps of a process compile, initialise CUDA and load their first buckets, so they get a generous fixed
allowance and do not count; after them a step may take 20× the median of the recent steps, never less
than 10 minutes (a new bucket shape that recompiles, a slow checkpoint filesystem, a data hiccup).
"""

from __future__ import annotations

import bisect
from collections import deque

from megagen.config import ConfigError

AUTO = -1.0
WARMUP_STEPS = 3
WARMUP_S = 1800.0
FLOOR_S = 600.0
FACTOR = 20.0
WINDOW = 100  # recent steps the median is taken over


class StepTimeLimit:
    """`seconds()` is the limit of the step now running; `step_done(dt)` feeds the auto rule."""

    def __init__(self, setting: float):
        if setting <= 0 and setting != AUTO:
            raise ConfigError("train.step_timeout_s", f"got {setting}; a limit is seconds > 0 or -1 = auto")
        self.setting = setting
        self.auto = setting == AUTO
        self._done = 0
        self._recent: deque[float] = deque()
        self._sorted: list[float] = []
        self._seconds = WARMUP_S if self.auto else setting

    def seconds(self) -> float:
        return self._seconds

    def median_s(self) -> float | None:
        """Median of the recent steps after warm-up (None before any)."""
        if not self._sorted:
            return None
        n = len(self._sorted)
        return (self._sorted[(n - 1) // 2] + self._sorted[n // 2]) / 2

    def step_done(self, seconds: float) -> None:
        self._done += 1
        if not self.auto or self._done <= WARMUP_STEPS:
            return
        self._recent.append(seconds)
        bisect.insort(self._sorted, seconds)
        if len(self._recent) > WINDOW:
            self._sorted.pop(bisect.bisect_left(self._sorted, self._recent.popleft()))
        self._seconds = max(FLOOR_S, FACTOR * self.median_s())

    def describe(self) -> str:
        """The limit and where it comes from, for the report."""
        if not self.auto:
            return f"{self._seconds:g}s (train.step_timeout_s={self.setting:g})"
        median = self.median_s()
        if median is None:
            rule = f"the first {WARMUP_STEPS} steps' allowance"
        else:
            rule = f"max({FLOOR_S:g}s, {FACTOR:g} x median step {median:.3g}s)"
        return f"{self._seconds:g}s (train.step_timeout_s=-1: auto, {rule})"
