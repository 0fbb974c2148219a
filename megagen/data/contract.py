"""The contracts between the data pieces: shard reader ↔ sampler ↔ loaders ↔ training loop.

- A *bucket* holds samples of one latent shape; a dataset is a set of buckets (see docs/data-format.md).
- The sampler turns (seed, step) into a `MicroBatchRequest` stream for one dp rank.
- A loader turns requests into batches: dict of torch tensors stacked on dim 0, with the keys
  `latents` (B, C, T, H, W), `text.<enc>` (B, L, D), `text_valid.<enc>` (B, L) bool,
  plus `fps`, `duration` (B,) and `caption_id` (B,) int64 when the dataset has them (and `sample_valid`
  (B,) bool with `data.on_error=skip`).
- The *host batch* (what the reader and the loaders' workers produce, what crosses processes and is
  copied host → device) keeps the **stored** dtypes: `latents` and `text.<enc>` float16 as stored (half
  the bytes of float32, no conversion on the CPU).
- The batch a loader *yields* is on the loader's device in the model's compute dtype: every floating
  field float32 (`COMPUTE_DTYPE`). `cast_to_compute` is the one place that cast happens, right after the
  host → device copy (on the GPU when the device is one); float16 → float32 is exact, so where it runs does
  not change a value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

COMPUTE_DTYPE = torch.float32
"""The dtype of every floating field of a batch the training loop gets."""


def cast_to_compute(batch: dict[str, Any]) -> dict[str, Any]:
    """A batch in stored dtypes → floating fields in `COMPUTE_DTYPE` (on their device; exact for float16),
    `caption_id` int64; other fields as they are. Call it after the host → device copy."""
    out = {}
    for k, v in batch.items():
        if v.is_floating_point() and v.dtype != COMPUTE_DTYPE:
            v = v.to(COMPUTE_DTYPE)
        elif k == "caption_id" and v.dtype != torch.int64:
            v = v.to(torch.int64)
        out[k] = v
    return out


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


def micro_sizes(requests) -> dict[str, int]:
    """The largest micro-batch of each bucket in `requests`, what loaders size their buffers for: asked of
    a plan that knows it (`RequestPlan.micro_sizes()`, no pass over its requests), else counted over a
    finite sequence of requests."""
    known = getattr(requests, "micro_sizes", None)
    if known is not None:
        return known()
    sizes: dict[str, int] = {}
    for r in requests:
        if r.sample_ids:
            sizes[r.bucket] = max(sizes.get(r.bucket, 0), len(r.sample_ids))
    return sizes
