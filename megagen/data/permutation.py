"""A seeded permutation of range(n) evaluated index by index: a bucket's epoch order without an O(n) array.

`IndexPermutation(n, key)(i)` is a bijection of [0, n): a balanced Feistel network over the smallest even
number of bits that covers n (a bijection of [0, 4^h)), restricted to [0, n) by cycle walking (an index
that lands outside is mapped again until it lands inside; as 4^h < 4n, that takes under 4 rounds on
average). Integer arithmetic only (numpy uint64, wrapping), so every rank, platform and process computes
the same order; cost per index is a few dozen integer operations, and nothing is stored but round keys.
"""

from __future__ import annotations

import numpy as np

_ROUNDS = 6
_MASK64 = (1 << 64) - 1


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective 64-bit mixer (uint64 in, uint64 out; multiplication wraps)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _mix_int(z: int) -> int:
    """`_mix` on one Python int (the same function: for the few indices of a micro-batch, without numpy's
    per-call overhead)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _round_keys(key: int) -> list[int]:
    keys, state = [], key & _MASK64
    for _ in range(_ROUNDS):
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        keys.append(_mix_int(state))
    return keys


_SMALL = 64
"""Up to this many indices are permuted with Python ints, more with numpy arrays."""


class IndexPermutation:
    """A seeded bijection of range(n), evaluated per index; see the module docstring."""

    def __init__(self, n: int, key: int):
        if n < 1:
            raise ValueError(f"a permutation needs n >= 1, got {n}")
        self.n = n
        self.half = max(1, ((n - 1).bit_length() + 1) // 2)
        """Bits per Feistel half: the domain is [0, 4^half) ⊇ [0, n)."""
        self._mask = (1 << self.half) - 1
        self._keys = _round_keys(key)

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        h, mask = np.uint64(self.half), np.uint64(self._mask)
        left, right = x >> h, x & mask
        for k in self._keys:
            left, right = right, left ^ (_mix(right ^ np.uint64(k)) & mask)
        return (left << h) | right

    def _feistel_int(self, x: int) -> int:
        h, mask = self.half, self._mask
        left, right = x >> h, x & mask
        for k in self._keys:
            left, right = right, left ^ (_mix_int(right ^ k) & mask)
        return (left << h) | right

    def one(self, i: int) -> int:
        """The image of one index (Python ints; the same value as `self([i])[0]`)."""
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} is outside [0, {self.n})")
        if self.n == 1:
            return i
        y = self._feistel_int(i)
        while y >= self.n:
            y = self._feistel_int(y)
        return y

    def __call__(self, indices) -> np.ndarray:
        """The images of `indices` (ints in [0, n)) as an int64 array."""
        if len(indices) <= _SMALL:
            return np.array([self.one(int(i)) for i in indices], dtype=np.int64)
        x = np.asarray(indices, dtype=np.int64)
        if x.size and (x.min() < 0 or x.max() >= self.n):
            raise IndexError(f"indices must lie in [0, {self.n})")
        if self.n == 1:
            return x.copy()
        with np.errstate(over="ignore"):
            y = self._feistel(x.astype(np.uint64))
            outside = y >= np.uint64(self.n)
            while outside.any():
                y[outside] = self._feistel(y[outside])
                outside = y >= np.uint64(self.n)
        return y.astype(np.int64)
