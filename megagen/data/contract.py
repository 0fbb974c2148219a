"""The contracts between the data pieces: shard reader ↔ sampler ↔ loaders ↔ training loop.

- A *bucket* holds samples of one latent shape; a dataset is a set of buckets (see docs/data-format.md).
- The sampler turns (seed, step) into a `MicroBatchRequest` stream for one dp rank.
- A loader turns requests into batches: dict of torch tensors stacked on dim 0, with the keys
  `latents` (B, C, T, H, W) float32, `text.<enc>` (B, L, D) float32, `text_valid.<enc>` (B, L) bool,
  plus `fps`, `duration` (B,) float32 and `caption_id` (B,) int64 when the dataset has them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MicroBatchRequest:
    """One micro-batch for one rank: which bucket, which samples of it, where they sit in the global batch."""

    step: int
    micro: int
    bucket: str
    sample_ids: tuple[int, ...]
    """Indices of samples within the bucket (0 .. bucket size − 1)."""
    positions: tuple[int, ...]
    """Positions of these samples in the step's global batch (keys of the per-sample noise/t draws)."""
    accumulation: int
    """Micro-batches in this step on this rank (global ÷ (micro × dp) for this bucket)."""
