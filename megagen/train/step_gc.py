"""Python's cyclic garbage collector, run at step boundaries instead of whenever it likes.

Why: an automatic collection lands at a random point of a step. On one rank of many it stalls every
collective of that step (the other ranks wait for the straggler); inside the data loader's `next()` it shows
up as data wait (measured: benchmarks/data_loaders.py). With `train.gc_every = N` automatic collection is
off while training and a full collection runs after every N-th optimizer step, on every rank at the same
point; 0 leaves Python's automatic collector alone.
"""

from __future__ import annotations

import gc


class StepGC:
    """`with StepGC(n) as g: ... g.step_done(step)`: collect after every n-th step; restores the
    collector's previous state on exit."""

    def __init__(self, every: int):
        if every < 0:
            raise ValueError(f"train.gc_every must be >= 0, got {every}")
        self.every = every
        self._was_enabled = gc.isenabled()

    def __enter__(self) -> StepGC:
        if self.every:
            self._was_enabled = gc.isenabled()
            gc.collect()  # start clean: setup garbage is not left to the first interval
            gc.disable()
        return self

    def step_done(self, step: int) -> None:
        if self.every and step % self.every == 0:
            gc.collect()

    def __exit__(self, *exc) -> None:
        if self.every and self._was_enabled:
            gc.enable()
