"""NaN/inf detection on stored latents, cheap enough to run on every read.

Shards store float16 or float32 latents; a bit test on the integer view finds a non-finite value without
a temporary array, and `copy_finite` fuses that test with the one copy out of the memory map.
"""

from __future__ import annotations

import numpy as np

COPY_CHUNK = 256 << 10
"""Elements per chunk of the fused copy + finite check of large latents (fits in cache)."""

FINITE_BOUNDS = {
    np.dtype(np.float16): (np.int16, np.uint16, 0x7C00, 0xFC00),
    np.dtype(np.float32): (np.int32, np.uint32, 0x7F800000, 0xFF800000),
}
"""float dtype → (signed view, unsigned view, smallest positive and negative non-finite bit patterns).

A value is NaN or inf ⇔ its exponent bits are all ones: as the signed integer view the positive ones are
the largest values (≥ 0x7C00 for float16), as the unsigned view the negative ones are (≥ 0xFC00). So two
read-only max reductions, no temporary array, find any non-finite value."""


def has_nonfinite(a: np.ndarray, axis: int | None = None):
    """Does `a` (float, C-contiguous) hold NaN or inf? (per row of a 2-d `a` with `axis=1`)"""
    bounds = FINITE_BOUNDS.get(a.dtype)
    if bounds is None:
        return ~np.isfinite(a).all(axis=axis)
    signed, unsigned, pos, neg = bounds
    return (a.view(signed).max(axis=axis) >= pos) | (a.view(unsigned).max(axis=axis) >= neg)


def copy_finite(dst: np.ndarray, src: np.ndarray, chunk: int = COPY_CHUNK) -> bool:
    """Copy `src` into `dst` (same shape and dtype, `dst` C-contiguous) chunk by chunk, checking each chunk
    for NaN/inf while it is in cache (`has_nonfinite`); True when every value is finite."""
    d, s = dst.reshape(-1), src.reshape(-1)
    finite = True
    for lo in range(0, len(d), chunk):
        part = d[lo : lo + chunk]
        np.copyto(part, s[lo : lo + chunk])
        if finite and has_nonfinite(part):
            finite = False
    return finite


def nonfinite_rows(stacked: np.ndarray) -> np.ndarray:
    """Per-sample bool: does stacked[i] hold NaN or inf? (samples stacked on dim 0)."""
    return has_nonfinite(np.ascontiguousarray(stacked).reshape(len(stacked), -1), axis=1)
