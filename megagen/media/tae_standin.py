"""STAND-IN for branch `tae` (megagen/specs/tae/load.py, tiling.py) until its interface lands: same
signatures, a trivial decoder (8x nearest upsampling + a 1x1x1 conv), so the media paths can be built and
tested first. Remove this file when the media code imports megagen.specs.tae."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

_STRIDE = 8


class _StandInTAE(nn.Module):
    def __init__(self, latent_channels: int = 16):
        super().__init__()
        self.latent_channels = latent_channels
        self.to_rgb = nn.Conv3d(latent_channels, 3, kernel_size=1)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        up = latents.repeat_interleave(_STRIDE, 2).repeat_interleave(_STRIDE, 3).repeat_interleave(_STRIDE, 4)
        return torch.tanh(self.to_rgb(up))


def load_tae(path, device="cpu"):
    """(TAE in eval mode, info with preset / latent_channels / compression)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        info = json.loads((fh.metadata() or {})["info"])
    tae = _StandInTAE(info["latent_channels"])
    tae.load_state_dict(tensors)
    return tae.to(device).eval(), info


def decode_tiled(tae, latents: torch.Tensor) -> torch.Tensor:
    """(B, C, T', H', W') latents -> (B, 3, 8T', 8H', 8W') video in [-1, 1]."""
    return tae.decode(latents)


def tiny_tae_for_tests(tmp_dir, latent_channels: int = 16) -> Path:
    from safetensors.torch import save_file

    tae = _StandInTAE(latent_channels)
    info = {"preset": "tiny", "latent_channels": latent_channels, "compression": [8, 8, 8]}
    path = Path(tmp_dir) / "tae_tiny.safetensors"
    save_file(dict(tae.state_dict()), str(path), metadata={"info": json.dumps(info)})
    return path
