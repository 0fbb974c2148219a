"""One rank's request stream: indexable, and as cheap to build for 10^9 steps as for 10.

`RequestPlan(sampler, steps, dp_rank, dp_size)` holds no request: request i (DALI's parallel external
source asks for batch i) is computed from the sampler's origin and i. With the same accumulation in every
bucket, request i is micro i mod a of step i // a; otherwise the plan counts requests through the
schedule's blocks (a binary search over blocks for a jump, a step at a time for the next request, which is
how loaders ask). Nothing here grows with the number of steps or samples.
"""

from __future__ import annotations

import operator

from megagen.data.contract import MicroBatchRequest
from megagen.data.schedule import BLOCK

_WALK = 4 * BLOCK
"""A request this many steps ahead of the last one looked up, or more, is found by binary search."""


class RequestPlan:
    """Steps [sampler.next_step, + `steps`) of dp rank `dp_rank` of `dp_size`, as micro-batch requests.

    `sampler` is a `BucketSampler` or `SyntheticSampler` (not advanced by the plan). Indexable, iterable
    and picklable; `state_after(k)` is the sampler state once k of its steps have run."""

    def __init__(self, sampler, steps: int, dp_rank: int, dp_size: int):
        if steps < 0:
            raise ValueError(f"a plan needs steps >= 0, got {steps}")
        self.sampler, self.steps, self.dp_rank, self.dp_size = sampler, steps, dp_rank, dp_size
        self.first = sampler.next_step
        self.end = self.first + steps
        names = sampler.names
        before, after = sampler.draws_since_origin(self.first), sampler.draws_since_origin(self.end)
        drawn = [b - a for a, b in zip(before, after)]
        self.used = [name for name, n in zip(names, drawn) if n]
        """Buckets that at least one step of the plan draws."""
        self.accum = [sampler.accumulation(name, dp_size) if n else 0 for name, n in zip(names, drawn)]
        """Micro-batches per step of each bucket on one rank (0: not drawn by this plan)."""
        used_accum = {a for a in self.accum if a}
        self._uniform = used_accum.pop() if len(used_accum) == 1 else None
        self._len = sum(a * n for a, n in zip(self.accum, drawn))
        self._first_q = self._requests_before(self.first)
        self._cursor = (self.first, self._first_q)
        """(a step, the absolute request count before it) of the last lookup: where the next one starts."""

    def __len__(self) -> int:
        return self._len

    def micro_sizes(self) -> dict[str, int]:
        """The micro-batch size of every bucket the plan draws (what loaders size their buffers for)."""
        return {name: self.sampler.buckets[name].micro_batch for name in self.used}

    def state_after(self, steps_done: int) -> dict:
        """Sampler state once `steps_done` steps of this plan have run (at most `steps`)."""
        return self.sampler.state_at(self.first + max(0, min(steps_done, self.steps)))

    def __iter__(self):
        for step in range(self.first, self.end):
            yield from self.sampler.step_requests(step, self.dp_rank, self.dp_size)

    def __getitem__(self, i: int) -> MicroBatchRequest:
        i = operator.index(i)  # ints and numpy integers (a DALI source may pass either)
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"request {i} is outside this plan's {self._len}")
        if self._uniform is not None:
            step, micro = self.first + i // self._uniform, i % self._uniform
        else:
            step, micro = self._locate(self._first_q + i)
        return self.sampler.step_request(step, micro, self.dp_rank, self.dp_size)

    # --------------------------------------------------------------- counting requests
    def _requests_before(self, step: int) -> int:
        """Requests of all steps in [0, step) under this plan's accumulations (an absolute count)."""
        return sum(a * n for a, n in zip(self.accum, self.sampler.schedule.counts_before(step)))

    def _locate(self, target: int) -> tuple[int, int]:
        """(step, micro) of the request with absolute count `target` (mixed accumulations)."""
        step, q = self._cursor
        if not (q <= target and step - self.first < self.steps):
            step, q = self.first, self._first_q
        if target - q >= _WALK:  # jump: the last block whose start is at or before the target
            lo, hi = step // BLOCK, (self.end - 1) // BLOCK
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if self._requests_before(mid * BLOCK) <= target:
                    lo = mid
                else:
                    hi = mid - 1
            if lo * BLOCK > step:
                step = lo * BLOCK
                q = self._requests_before(step)
        schedule = self.sampler.schedule
        while True:
            n = self.accum[schedule.bucket_of_step(step)]
            if target < q + n:
                self._cursor = (step, q)
                return step, target - q
            step, q = step + 1, q + n
