"""The bucket sampler: which bucket and which samples each optimizer step uses, for any mesh.

Every step draws one bucket (all ranks agree: the draw depends only on (seed, step)), then takes that
bucket's next `global` samples from a per-bucket permutation that is fixed by (seed, bucket, epoch).
A bucket's epoch covers each of its samples once; the last `size mod global` samples of a bucket epoch
(the tail) are skipped. The global batch is split into micro-batches for data-parallel rank r:
position i of the global batch goes to micro j = i // (micro·dp), rank (i // micro) mod dp. The state
(next step, each bucket's epoch and cursor) is a small dict independent of the dp size, so a resumed run
may use another mesh.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from megagen.config import ConfigError
from megagen.data.contract import MicroBatchRequest
from megagen.data.synthetic import sample_seed

_BUCKET_STREAM, _PERM_STREAM = 11, 12


@dataclass(frozen=True)
class BucketPlan:
    """A bucket's size and batch sizes."""

    name: str
    size: int
    global_batch: int
    micro_batch: int


def _bucket_key(name: str) -> int:
    return int.from_bytes(name.encode()[:8].ljust(8, b"\0"), "little") ^ len(name)


class BucketSampler:
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
            w = [float(weights.get(b.name, 0.0)) for b in buckets]
        else:  # each bucket's share of the steps of one pass over all the data
            w = [b.size // b.global_batch for b in buckets]
        if sum(w) <= 0:
            raise ConfigError("data.bucket_weights", "all bucket weights are zero")
        self.names = [b.name for b in buckets]
        self.weights = torch.tensor(w, dtype=torch.float64) / sum(w)
        self.state = {"step": 0, "buckets": {b.name: {"epoch": 0, "cursor": 0} for b in buckets}}

    # --------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return copy.deepcopy(self.state)

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.buckets) - set(state.get("buckets", {}))
        if missing:
            raise ConfigError(
                "data.path", f"sampler state lacks buckets {sorted(missing)}: is this the same dataset?"
            )
        self.state = copy.deepcopy(state)

    # --------------------------------------------------------------- drawing
    def _permutation(self, name: str, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(sample_seed(self.seed, epoch, _bucket_key(name), _PERM_STREAM))
        return torch.randperm(self.buckets[name].size, generator=gen)

    def bucket_of_step(self, step: int) -> str:
        gen = torch.Generator().manual_seed(sample_seed(self.seed, step, 0, _BUCKET_STREAM))
        return self.names[int(torch.multinomial(self.weights, 1, generator=gen))]

    def next_global_batch(self) -> tuple[int, str, list[int]]:
        """(step, bucket, sample ids of the whole global batch); advances the state."""
        step = self.state["step"]
        name = self.bucket_of_step(step)
        plan, pos = self.buckets[name], self.state["buckets"][name]
        if pos["cursor"] + plan.global_batch > plan.size:  # tail of this bucket epoch
            pos["epoch"] += 1
            pos["cursor"] = 0
        perm = self._permutation(name, pos["epoch"])
        ids = perm[pos["cursor"] : pos["cursor"] + plan.global_batch].tolist()
        pos["cursor"] += plan.global_batch
        self.state["step"] = step + 1
        return step, name, ids

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

    def rank_requests(
        self, step: int, name: str, ids: list[int], dp_rank: int, dp_size: int
    ) -> list[MicroBatchRequest]:
        """This rank's micro-batches of one global batch."""
        plan = self.buckets[name]
        accum = self.accumulation(name, dp_size)
        out = []
        for micro in range(accum):
            start = (micro * dp_size + dp_rank) * plan.micro_batch
            positions = tuple(range(start, start + plan.micro_batch))
            out.append(
                MicroBatchRequest(step, micro, name, tuple(ids[p] for p in positions), positions, accum)
            )
        return out


class RequestPlan:
    """The precomputed request stream of one rank for `steps` steps, and the sampler state at each step.

    Indexable (DALI's parallel external source asks for batch i) and cheap: a few integers per sample.
    """

    def __init__(self, sampler: BucketSampler, steps: int, dp_rank: int, dp_size: int):
        self.requests: list[MicroBatchRequest] = []
        self.states: list[dict] = []
        for _ in range(steps):
            self.states.append(sampler.state_dict())
            step, name, ids = sampler.next_global_batch()
            self.requests.extend(sampler.rank_requests(step, name, ids, dp_rank, dp_size))
        self.final_state = sampler.state_dict()

    def __len__(self) -> int:
        return len(self.requests)

    def __getitem__(self, i: int) -> MicroBatchRequest:
        return self.requests[i]

    def __iter__(self):
        return iter(self.requests)

    def state_after(self, steps_done: int) -> dict:
        """Sampler state once `steps_done` steps of this plan have run."""
        return self.states[steps_done] if steps_done < len(self.states) else self.final_state


class SyntheticSampler:
    """The synthetic stand-in: one unbounded bucket whose sample ids are the global-batch positions."""

    BUCKET = "synthetic"

    def __init__(self, global_batch: int, micro_batch: int):
        self.buckets = {self.BUCKET: BucketPlan(self.BUCKET, 2**62, global_batch, micro_batch)}
        self.state = {"step": 0, "buckets": {}}

    def state_dict(self) -> dict:
        return copy.deepcopy(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = copy.deepcopy(state)

    def next_global_batch(self) -> tuple[int, str, list[int]]:
        step = self.state["step"]
        self.state["step"] = step + 1
        return step, self.BUCKET, list(range(self.buckets[self.BUCKET].global_batch))

    accumulation = BucketSampler.accumulation
    rank_requests = BucketSampler.rank_requests
