"""FLOPs of one TAE training sample, counted by running the model on the meta device.

A convolutional autoencoder has no closed form as short as a transformer's, so torch's FLOP counter
measures one forward (convolutions, linears, attention) on meta tensors — no memory, no compute. Backward
is counted as 2 x forward (the pixel input needs no gradient, a small saving ignored here); the TAE's
stages are never recomputed, so hardware FLOPs equal model FLOPs unless `train.recompute=full`.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.flop_counter import FlopCounterMode

from megagen.metrics.flops import FlopCount
from megagen.specs.tae.model import TAE, TAEArch


@functools.lru_cache(maxsize=16)
def _forward_flops(arch: TAEArch, video_shape: tuple[int, ...]) -> float:
    with torch.device("meta"):
        model = TAE(arch)
        video = torch.empty((1, *video_shape))
    with FlopCounterMode(display=False) as counter:
        model(video)
    return float(counter.get_total_flops())


def tae_flops(arch: TAEArch, video_shape: tuple[int, ...], recompute: str = "none") -> FlopCount:
    """FlopCount for one (3, T, H, W) clip."""
    forward = _forward_flops(arch, tuple(video_shape))
    model = 3.0 * forward
    hardware = model + forward if recompute == "full" else model
    return FlopCount(forward, model, hardware)
