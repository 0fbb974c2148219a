"""The TAE as `megagen data encode` uses it: load a checkpoint, encode a clip in temporal tiles.

LOCAL STAND-IN until the TAE spec lands (branch tae: megagen/specs/tae/{tiling,load}.py): the same three
functions with the same shapes, (B, 3, T, H, W) in [-1, 1] → (B, 16, ceil(T/8), H/8, W/8), from an
average-pool and a fixed random 1x1 projection. Replace this module's body by imports from there.
"""

from __future__ import annotations

import json
import math
import os

import torch
import torch.nn.functional as F

LATENT_CHANNELS = 16


class _StandInTAE(torch.nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.proj = torch.nn.Parameter(torch.randn(LATENT_CHANNELS, 3, generator=g) * 0.5)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        t = video.shape[2]
        pad = math.ceil(t / 8) * 8 - t
        if pad:
            video = torch.cat([video, video[:, :, -1:].expand(-1, -1, pad, -1, -1)], dim=2)
        pooled = F.avg_pool3d(video, kernel_size=8)
        return torch.einsum("oc,bcthw->bothw", self.proj, pooled)


def encode_tiled(tae, video: torch.Tensor) -> torch.Tensor:
    """(B, 3, T, H, W) in [-1, 1] → latents (B, 16, ceil(T/8), H/8, W/8), 32-frame tiles."""
    tiles = [tae.encode(video[:, :, s : s + 32]) for s in range(0, video.shape[2], 32)]
    return torch.cat(tiles, dim=2)


def load_tae(path: str):
    """(tae, info) from a checkpoint written by `tiny_tae_for_tests`."""
    with open(os.path.join(path, "standin_tae.json"), encoding="utf-8") as f:
        info = json.load(f)
    return _StandInTAE(info["seed"]).eval(), info


def tiny_tae_for_tests(tmp_dir: str) -> str:
    path = os.path.join(tmp_dir, "tae")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "standin_tae.json"), "w", encoding="utf-8") as f:
        json.dump({"seed": 0, "latent_channels": LATENT_CHANNELS}, f)
    return path
