"""Each bucket's micro-batch size: `auto`, or an explicit one that memory allows.

`train.micro_batch_size=auto` (the default) takes, per bucket, the largest size that divides the bucket's
global batch ÷ data-parallel size and whose activations fit this rank's memory; an explicit size that
cannot fit is refused before the first step (rather than the kernel killing the process mid-step).
The memory bound comes from the planner's model of saved activations and parameter/optimizer state for
the config's layout (megagen/planning.py), against the device's memory (GPU) or this rank's share of the
host's available memory (CPU).
"""

from __future__ import annotations

import logging

from megagen.config import ConfigError

log = logging.getLogger("megagen")

AUTO = "auto"
AUTO_MEMORY_SHARE = 0.5
"""`auto` plans activations for at most this share of the memory left after parameters and optimizer
state: the planner's activation model leaves out allocator fragmentation, workspaces and the loader."""


def micro_batch_key(bucket: str, per_bucket: bool) -> str:
    return f"data.bucket_batch.{bucket}.micro" if per_bucket else "train.micro_batch_size"


def resolve_micro_batch(
    requested, global_batch: int, dp_size: int, fits, bucket: str, per_bucket: bool = False
) -> int:
    """The micro-batch size of `bucket`. `fits(n, share)` says whether n samples' activations fit in
    `share` of the memory left for them (None: no memory model, anything fits)."""
    if global_batch % dp_size:
        raise ConfigError(
            f"data.bucket_batch.{bucket}.global" if per_bucket else "train.global_batch_size",
            f"bucket {bucket}: global batch {global_batch} is not divisible by the data-parallel size "
            f"{dp_size}",
        )
    per_rank = global_batch // dp_size
    if requested == AUTO:
        sizes = [n for n in range(per_rank, 0, -1) if per_rank % n == 0]
        chosen = next((n for n in sizes if fits is None or fits(n, AUTO_MEMORY_SHARE)), 1)
        return chosen
    if fits is not None and not fits(requested, 1.0):
        largest = next((n for n in range(requested, 0, -1) if fits(n, 1.0)), 0)
        raise ConfigError(
            micro_batch_key(bucket, per_bucket),
            f"{requested} samples of bucket {bucket} need more memory for activations than this rank has "
            f"(at most {largest} fit); use a smaller size or auto",
        )
    return requested
