"""Which bucket each optimizer step draws: weight-proportional, stratified, seeded, and O(1) to query.

The steps of the whole job form one infinite sequence of bucket draws, fixed by (seed, weights):

1. *Merge.* Bucket b (integer weight a_b > 0, the weights scaled exactly to coprime integers) owns the
   points (k + u_b) / a_b, k = 0, 1, ..., with a seeded phase u_b in (0, 1); all points in increasing order
   (ties: lower bucket index first) give the merge sequence. Among its first m slots bucket b holds
   m·a_b/A to within B + 1 (A = Σ a, B buckets): every bucket gets exactly its share of the steps, evenly
   spread.
2. *Shuffle.* Steps come in blocks of `BLOCK`; block j holds the merge slots [j·BLOCK, (j+1)·BLOCK) in an
   order drawn from (seed, j) (a seeded `IndexPermutation` of the block). So any window of L steps holds
   bucket b's share L·a_b/A to within 2·BLOCK + 2B + 2 steps, in a random order.

Everything a step needs is computable from its number alone: the count of draws of each bucket before
slot m is found by counting the points below (m - B)/A (one integer division per bucket) and walking at
most 2B slots on from there with a heap. A block costs O(B log B + BLOCK log B) integer operations; no
state grows with the number of steps. Integer arithmetic only, defined here (no library RNG), so every
rank, platform and library version draws the same buckets.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

from megagen.data.permutation import IndexPermutation
from megagen.data.synthetic import sample_seed

BLOCK = 64
"""Steps per shuffled block: the scale below which the bucket order is random, above which it is exact."""
_PHASE_DENOM = 1 << 32
_PHASE_STREAM, _SHUFFLE_STREAM = 13, 14


def integer_weights(weights) -> list[int]:
    """Non-negative weights (ints or floats, read exactly) scaled to coprime integers of the same ratios."""
    fractions = [Fraction(w) for w in weights]
    if any(f < 0 for f in fractions):
        raise ValueError(f"weights must be >= 0, got {list(weights)}")
    scale = math.lcm(*(f.denominator for f in fractions))
    ints = [int(f * scale) for f in fractions]
    common = math.gcd(*ints)
    if common == 0:
        raise ValueError("all weights are zero")
    return [w // common for w in ints]


@dataclass(frozen=True)
class Block:
    """Steps [start_step, start_step + BLOCK) of the schedule."""

    start_counts: tuple[int, ...]
    """Draws of each bucket before the block's first step."""
    buckets: tuple[int, ...]
    """The bucket index of each step of the block."""
    occurrence: tuple[int, ...]
    """For each step of the block: how many earlier steps of the block drew the same bucket."""


class BucketSchedule:
    """The bucket of every step for weights `weights` (one per bucket; see the module docstring).

    `keys`: a stable integer per bucket (from its name), so that a bucket's phase does not depend on its
    position in the list. Picklable; blocks are cached per process (a few dozen)."""

    def __init__(self, weights, keys, seed: int):
        if len(weights) != len(keys) or not weights:
            raise ValueError("need one weight and one key per bucket, and at least one bucket")
        self.weights = integer_weights(weights)
        self.total = sum(self.weights)
        self.active = [b for b, w in enumerate(self.weights) if w > 0]
        self.seed = seed
        self.phases = [1 + sample_seed(seed, k, 0, _PHASE_STREAM) % (_PHASE_DENOM - 1) for k in keys]
        """u_b = phases[b] / 2^32, in (0, 1)."""
        self._make_cache()

    def _make_cache(self) -> None:
        self.block = lru_cache(maxsize=64)(self._block)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["block"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._make_cache()

    # ------------------------------------------------------------------- the merge
    def _key(self, b: int, k: int) -> tuple[Fraction, int]:
        """Point k of bucket b as a heap entry: (its place in the merge, b; ties go to the lower b)."""
        return Fraction(k * _PHASE_DENOM + self.phases[b], self.weights[b] * _PHASE_DENOM), b

    def _below(self, b: int, p: int, q: int) -> int:
        """Points of bucket b below p/q (p, q > 0 integers): #{k >= 0 : (k + u_b)/a_b < p/q}."""
        denom = q * _PHASE_DENOM
        return -((self.phases[b] * q - p * self.weights[b] * _PHASE_DENOM) // denom)

    def _walk_to(self, slot: int) -> tuple[list[int], list]:
        """(draws of each bucket in merge slots [0, slot), the heap of each active bucket's next point)."""
        counts = [0] * len(self.weights)
        p = slot - len(self.active)
        if p > 0:
            for b in self.active:
                counts[b] = self._below(b, p, self.total)
        heap = [self._key(b, counts[b]) for b in self.active]
        heapq.heapify(heap)
        for _ in range(slot - sum(counts)):
            self._pop(heap, counts)
        return counts, heap

    def _pop(self, heap: list, counts: list[int]) -> int:
        _, b = heapq.heappop(heap)
        counts[b] += 1
        heapq.heappush(heap, self._key(b, counts[b]))
        return b

    # ------------------------------------------------------------------- blocks and steps
    def _block(self, j: int) -> Block:
        if len(self.active) == 1:
            (b,) = self.active
            counts = [0] * len(self.weights)
            counts[b] = j * BLOCK
            return Block(tuple(counts), (b,) * BLOCK, tuple(range(BLOCK)))
        counts, heap = self._walk_to(j * BLOCK)
        start = tuple(counts)
        slots = [self._pop(heap, counts) for _ in range(BLOCK)]
        shuffle = IndexPermutation(BLOCK, sample_seed(self.seed, j, 0, _SHUFFLE_STREAM))
        order = [slots[shuffle.one(i)] for i in range(BLOCK)]
        seen = [0] * len(self.weights)
        occurrence = []
        for b in order:
            occurrence.append(seen[b])
            seen[b] += 1
        return Block(start, tuple(order), tuple(occurrence))

    def bucket_of_step(self, step: int) -> int:
        return self.block(step // BLOCK).buckets[step % BLOCK]

    def draw(self, step: int) -> tuple[int, int]:
        """(bucket index, how many earlier steps drew that bucket) of `step`."""
        blk = self.block(step // BLOCK)
        o = step % BLOCK
        b = blk.buckets[o]
        return b, blk.start_counts[b] + blk.occurrence[o]

    def counts_before(self, step: int) -> list[int]:
        """Draws of each bucket in steps [0, step)."""
        blk = self.block(step // BLOCK)
        counts = list(blk.start_counts)
        for b in blk.buckets[: step % BLOCK]:
            counts[b] += 1
        return counts
