"""Temporal tiling: encode and decode videos longer than the TAE sees at once, in bounded memory.

Encode: tiles of 32 frames (4 latent frames) without overlap, each encoded alone; the latent is the
posterior mean. Tile boundaries sit on multiples of the 8x temporal stride, so the tiles' latents
concatenate to ceil(T / 8) frames. Tiled equals untiled exactly when T <= 32 (one tile); for longer
videos it equals untiled wherever no layer's temporal receptive field crosses a tile boundary (the
temporal convolutions and temporal attention do cross it in a trained TAE, which is why Movie Gen's
decoder blends overlapping tiles rather than trusting a seam).

Decode: tiles of 4 latent frames starting every 2 latent frames, so neighbours share 2 latent frames (16
video frames). In a shared span the earlier tile's weight falls linearly from 1 towards 0 while the later
tile's rises by the same amount, so at every frame the weights of the covering tiles sum to 1.
"""

from __future__ import annotations

import torch
from torch import nn

ENCODE_TILE_FRAMES = 32
DECODE_TILE_LATENTS = 4
DECODE_OVERLAP_LATENTS = 2


def _temporal_factor(tae: nn.Module) -> int:
    return tae.arch.compression[0]


def _like_weights(tae: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`x` on the TAE's device and in its parameters' dtype (callers may pass CPU float32)."""
    weight = next(tae.parameters())
    return x.to(device=weight.device, dtype=weight.dtype)


@torch.no_grad()
def encode_tiled(tae: nn.Module, video: torch.Tensor, tile_frames: int = ENCODE_TILE_FRAMES) -> torch.Tensor:
    """video (B, 3, T, H, W) in [-1, 1] → latents (B, 16, ceil(T/8), H/8, W/8), the posterior mean."""
    factor = _temporal_factor(tae)
    if tile_frames % factor:
        raise ValueError(f"tile_frames={tile_frames} must be a multiple of the temporal stride {factor}")
    video = _like_weights(tae, video)
    pieces = [
        tae.encode_moments(video[:, :, start : start + tile_frames])[0]
        for start in range(0, video.shape[2], tile_frames)
    ]
    return torch.cat(pieces, dim=2)


def decode_spans(latent_frames: int, tile: int = DECODE_TILE_LATENTS, overlap: int = DECODE_OVERLAP_LATENTS):
    """Latent-frame spans [lo, hi) of the decode tiles: every `tile - overlap` frames, the last cut short."""
    stride = tile - overlap
    spans, lo = [], 0
    while True:
        hi = min(lo + tile, latent_frames)
        spans.append((lo, hi))
        if hi >= latent_frames:
            return spans
        lo += stride


def blend_weights(spans: list[tuple[int, int]], factor: int) -> list[torch.Tensor]:
    """Per-tile weights over its video frames (float64): linear cross-fades in shared spans, sum 1."""
    weights = [torch.ones((hi - lo) * factor, dtype=torch.float64) for lo, hi in spans]
    for k in range(1, len(spans)):
        start, prev_end = spans[k][0] * factor, spans[k - 1][1] * factor
        shared = prev_end - start
        if shared <= 0:
            continue
        rise = (torch.arange(shared, dtype=torch.float64) + 0.5) / shared
        weights[k][:shared] = rise
        weights[k - 1][-shared:] = 1.0 - rise
    return weights


@torch.no_grad()
def decode_tiled(tae: nn.Module, latents: torch.Tensor, frames: int | None = None) -> torch.Tensor:
    """latents (B, 16, t, h, w) → video (B, 3, 8t, 8h, 8w) (cropped to `frames` when given).

    Tiles of 4 latent frames overlap by 2; overlapping outputs are blended with `blend_weights`.
    """
    factor = _temporal_factor(tae)
    latents = _like_weights(tae, latents)
    spans = decode_spans(latents.shape[2])
    out = None
    for (lo, hi), w in zip(spans, blend_weights(spans, factor)):
        piece = tae.decode(latents[:, :, lo:hi])
        if out is None:
            b, c, _, h, wd = piece.shape
            out = torch.zeros(b, c, latents.shape[2] * factor, h, wd, dtype=piece.dtype, device=piece.device)
        weight = w.to(device=piece.device, dtype=piece.dtype).view(1, 1, -1, 1, 1)
        out[:, :, lo * factor : hi * factor] += piece * weight
    return out if frames is None else out[:, :, :frames]
