"""From decoded frames to the TAE's input: resample to the recorded fps, resize to cover the bucket, crop.

Frames are taken at times k / fps (the source frame showing at that time), so every sample of a dataset
moves at the same speed whatever its source rate; the fps is recorded per sample for the model's
conditioning. Resizing keeps the aspect ratio and covers the bucket, the centre is kept.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from megagen.data.encode.buckets import PixelBucket


def sample_times(available: int, source_fps: float, fps: float, count: int) -> list[int]:
    """Indices of the source frames shown at times 0, 1/fps, ..., (count-1)/fps (clamped to the clip)."""
    return [min(available - 1, math.floor(k * source_fps / fps + 1e-6)) for k in range(count)]


def fit_to_bucket(frames: np.ndarray, bucket: PixelBucket) -> torch.Tensor:
    """(T, H, W, 3) uint8 → (3, T, bucket.height, bucket.width) float32 in [-1, 1]: resized (antialiased,
    aspect kept) to cover the bucket, centre-cropped."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    scale = max(bucket.width / w, bucket.height / h)
    size = (max(bucket.height, round(h * scale)), max(bucket.width, round(w * scale)))
    if size != (h, w):
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - bucket.height) // 2, (size[1] - bucket.width) // 2
    x = x[:, :, top : top + bucket.height, left : left + bucket.width]
    return (x / 127.5 - 1.0).clamp_(-1.0, 1.0).permute(1, 0, 2, 3).contiguous()


def clip_for_bucket(frames: np.ndarray, source_fps: float, fps: float, bucket: PixelBucket) -> torch.Tensor:
    """The bucket's frames of a decoded clip at `fps`, ready for the TAE: (3, T, H, W) in [-1, 1]."""
    picked = frames[sample_times(len(frames), source_fps, fps, bucket.frames(fps))]
    return fit_to_bucket(picked, bucket)
