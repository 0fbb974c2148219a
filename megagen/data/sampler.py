"""The bucket sampler: which bucket and which samples each optimizer step uses, for any mesh, in O(1).

Step s draws the bucket `BucketSchedule` gives it (megagen/data/schedule.py: a function of (seed, weights,
s), so all ranks agree), then that bucket's next `global` samples in its epoch order, a seeded bijection of
the bucket's sample indices fixed by (seed, bucket, epoch) and evaluated per index
(megagen/data/permutation.py). A bucket's epoch covers each of its samples once; the last `size mod global`
samples of a bucket epoch (the tail) are skipped. The global batch is split into micro-batches for
data-parallel rank r: position i of the global batch goes to micro j = i // (micro·dp), rank
(i // micro) mod dp.

The state (next step, each bucket's epoch and cursor) is a small dict independent of the dp size, so a
resumed run may use another mesh. A sampler is anchored at the state it was loaded with (its origin):
the samples of any later step follow from the origin and the number of draws of each bucket since then,
which the schedule counts without visiting the steps in between. Resuming with the same configuration
therefore continues the uninterrupted run exactly; resuming with other batch sizes or weights continues
each bucket from its saved epoch and cursor.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from functools import lru_cache

from megagen.config import ConfigError
from megagen.data.contract import MicroBatchRequest
from megagen.data.permutation import IndexPermutation
from megagen.data.schedule import BucketSchedule
from megagen.data.synthetic import sample_seed

_PERM_STREAM = 12


@dataclass(frozen=True)
class BucketPlan:
    """A bucket's size and batch sizes."""

    name: str
    size: int
    global_batch: int
    micro_batch: int


def _bucket_key(name: str) -> int:
    """A stable 63-bit integer of the whole name (distinct names give distinct epoch orders and phases)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little") >> 1


class _AnchoredSampler:
    """What both samplers share: an origin state, a schedule, and the per-rank split of a global batch."""

    buckets: dict[str, BucketPlan]
    names: list[str]
    schedule: BucketSchedule
    origin: dict

    def _init_state(self, state: dict) -> None:
        self.origin = copy.deepcopy(state)
        self._next = self.origin["step"]
        self._origin_counts = self.schedule.counts_before(self._next)

    # --------------------------------------------------------------- state
    @property
    def origin_step(self) -> int:
        return self.origin["step"]

    @property
    def next_step(self) -> int:
        """The step `next_global_batch()` returns next (a `RequestPlan` starts there)."""
        return self._next

    @property
    def state(self) -> dict:
        """The state before the next `next_global_batch()`."""
        return self.state_at(self._next)

    def state_dict(self) -> dict:
        return self.state_at(self._next)

    def draws_since_origin(self, step: int) -> list[int]:
        """Draws of each bucket in steps [origin, step)."""
        if step < self.origin_step:
            raise ValueError(f"step {step} is before this sampler's origin (step {self.origin_step})")
        return [n - o for n, o in zip(self.schedule.counts_before(step), self._origin_counts)]

    def bucket_of_step(self, step: int) -> str:
        return self.names[self.schedule.bucket_of_step(step)]

    def draw(self, step: int) -> tuple[str, int]:
        """(bucket, how many steps in [origin, step) drew that bucket) of `step` >= origin."""
        if step < self.origin_step:
            raise ValueError(f"step {step} is before this sampler's origin (step {self.origin_step})")
        b, count = self.schedule.draw(step)
        return self.names[b], count - self._origin_counts[b]

    def global_batch(self, step: int) -> tuple[int, str, list[int]]:
        """(step, bucket, sample ids of the whole global batch) of `step` >= origin."""
        name, d = self.draw(step)
        return step, name, self.sample_ids(name, d, range(self.buckets[name].global_batch))

    def next_global_batch(self) -> tuple[int, str, list[int]]:
        """The global batch of the next step; advances `state`."""
        out = self.global_batch(self._next)
        self._next += 1
        return out

    # --------------------------------------------------------------- the split over ranks
    def accumulation(self, name: str, dp_size: int) -> int:
        plan = self.buckets[name]
        per = plan.micro_batch * dp_size
        if plan.global_batch % per:
            raise ConfigError(
                "train.global_batch_size",
                f"bucket {name}: global batch {plan.global_batch} is not divisible by micro-batch × "
                f"data-parallel size = {plan.micro_batch} × {dp_size} "
                f"(set train.* or data.bucket_batch.{name})",
            )
        return plan.global_batch // per

    def step_request(self, step: int, micro: int, dp_rank: int, dp_size: int) -> MicroBatchRequest:
        """Micro-batch `micro` of `step` on dp rank `dp_rank` (only its own samples are looked up)."""
        name, d = self.draw(step)
        plan = self.buckets[name]
        accum = self.accumulation(name, dp_size)
        if not 0 <= micro < accum:
            raise IndexError(f"step {step} has {accum} micro-batches per rank, not {micro + 1}")
        start = (micro * dp_size + dp_rank) * plan.micro_batch
        positions = tuple(range(start, start + plan.micro_batch))
        ids = tuple(self.sample_ids(name, d, positions))
        return MicroBatchRequest(step, micro, name, ids, positions, accum)

    def step_requests(self, step: int, dp_rank: int, dp_size: int) -> list[MicroBatchRequest]:
        """This rank's micro-batches of `step`."""
        accum = self.accumulation(self.bucket_of_step(step), dp_size)
        return [self.step_request(step, micro, dp_rank, dp_size) for micro in range(accum)]

    def sample_ids(self, name: str, draw: int, positions) -> list[int]:
        raise NotImplementedError

    def state_at(self, step: int) -> dict:
        raise NotImplementedError


class BucketSampler(_AnchoredSampler):
    """Deterministic step → (bucket, sample ids) for the whole job; see the module docstring."""

    def __init__(self, buckets: list[BucketPlan], seed: int, weights: dict[str, float] | None = None):
        if not buckets:
            raise ConfigError("data.path", "the dataset has no buckets")
        self.buckets = {b.name: b for b in buckets}
        self.seed = seed
        for b in buckets:
            if b.size < b.global_batch:
                raise ConfigError(
                    f"data.bucket_batch.{b.name}",
                    f"global batch {b.global_batch} exceeds the bucket's {b.size} samples",
                )
        unknown = set(weights or {}) - set(self.buckets)
        if unknown:
            raise ConfigError(
                "data.bucket_weights", f"unknown buckets {sorted(unknown)}; have {sorted(self.buckets)}"
            )
        if weights:
            w = [weights.get(b.name, 0) for b in buckets]
        else:  # each bucket's share of the steps of one pass over all the data
            w = [b.size // b.global_batch for b in buckets]
        bad = [n for n, x in zip([b.name for b in buckets], w) if not (x >= 0 and x != float("inf"))]
        if bad:
            raise ConfigError(
                f"data.bucket_weights.{bad[0]}", f"expected a finite weight >= 0, got {weights[bad[0]]!r}"
            )
        if sum(w) <= 0:
            raise ConfigError("data.bucket_weights", "all bucket weights are zero")
        self.names = [b.name for b in buckets]
        self.schedule = BucketSchedule(w, [_bucket_key(n) for n in self.names], seed)
        self._make_cache()
        self._init_state({"step": 0, "buckets": {b.name: {"epoch": 0, "cursor": 0} for b in buckets}})

    def _make_cache(self) -> None:
        self._permutation = lru_cache(maxsize=64)(self._new_permutation)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_permutation"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._make_cache()

    def load_state_dict(self, state: dict) -> None:
        """Anchor the sampler at `state` (a `state_dict()`, e.g. from a checkpoint)."""
        buckets = state.get("buckets", {}) if isinstance(state, dict) else {}
        missing = set(self.buckets) - set(buckets)
        if missing:
            raise ConfigError(
                "data.path", f"sampler state lacks buckets {sorted(missing)}: is this the same dataset?"
            )
        for name in self.buckets:
            pos = buckets[name]
            if not (isinstance(pos, dict) and all(_count(pos.get(k)) for k in ("epoch", "cursor"))):
                raise ConfigError(
                    "checkpoint.resume", f"sampler state of bucket {name} is malformed: {pos!r}"
                )
        _check_step(state)
        self._init_state(state)

    # --------------------------------------------------------------- positions
    def _new_permutation(self, name: str, epoch: int) -> IndexPermutation:
        key = sample_seed(self.seed, epoch, _bucket_key(name), _PERM_STREAM)
        return IndexPermutation(self.buckets[name].size, key)

    def _position(self, name: str, draw: int) -> tuple[int, int]:
        """(epoch, cursor) of the `draw`-th draw of bucket `name` since the origin (0-based)."""
        plan, start = self.buckets[name], self.origin["buckets"][name]
        epoch, cursor = start["epoch"], start["cursor"]
        left = max(0, (plan.size - cursor) // plan.global_batch)  # full batches left in the origin's epoch
        if draw < left:
            return epoch, cursor + draw * plan.global_batch
        per_epoch = plan.size // plan.global_batch
        later = draw - left
        return epoch + 1 + later // per_epoch, (later % per_epoch) * plan.global_batch

    def sample_ids(self, name: str, draw: int, positions) -> list[int]:
        epoch, cursor = self._position(name, draw)
        return self._permutation(name, epoch)([cursor + p for p in positions]).tolist()

    def state_at(self, step: int) -> dict:
        """The state before `step` (>= the origin's step): computed from the origin, visiting no step."""
        state = copy.deepcopy(self.origin)
        state["step"] = step
        for name, draws in zip(self.names, self.draws_since_origin(step)):
            if draws:
                epoch, cursor = self._position(name, draws - 1)
                state["buckets"][name] = {"epoch": epoch, "cursor": cursor + self.buckets[name].global_batch}
        return state


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_step(state) -> None:
    if not isinstance(state, dict) or not _count(state.get("step")):
        got = state.get("step") if isinstance(state, dict) else state
        raise ConfigError("checkpoint.resume", f"sampler state has no valid step: {got!r}")


class SyntheticSampler(_AnchoredSampler):
    """The synthetic stand-in: one unbounded bucket whose sample ids are the global-batch positions."""

    BUCKET = "synthetic"

    def __init__(self, global_batch: int, micro_batch: int):
        self.buckets = {self.BUCKET: BucketPlan(self.BUCKET, 2**62, global_batch, micro_batch)}
        self.names = [self.BUCKET]
        self.schedule = BucketSchedule([1], [0], 0)
        self._init_state({"step": 0, "buckets": {}})

    def load_state_dict(self, state: dict) -> None:
        _check_step(state)
        self._init_state(state)

    def sample_ids(self, name: str, draw: int, positions) -> list[int]:
        return list(positions)

    def state_at(self, step: int) -> dict:
        return {**copy.deepcopy(self.origin), "step": step}


from megagen.data.request_plan import RequestPlan  # noqa: E402  (its home; re-exported for callers)

__all__ = ["BucketPlan", "BucketSampler", "RequestPlan", "SyntheticSampler"]
