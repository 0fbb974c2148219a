"""Movie Gen spatial upsampler: the video transformer with a second latent concatenated on channels.

The low-resolution video is upsampled bilinearly in pixel space and encoded by the TAE upstream, so its
latent arrives at the high-resolution latent shape. Both latents are patchified the same way and each
token is `[noisy high-res patch ; low-res-conditioned patch]`: the patch embedding reads 2 × patch_dim
features. The columns reading the conditioning latent start at zero, so an upsampler started from its
text-to-video parent's weights (`checkpoint.init_from`: patch_embed's new input columns are zero, position
tables keep the parent's rows; `upsampler_from_parent` in memory) computes exactly what the parent computes,
whatever the low-res latent.
"""

from __future__ import annotations

import torch
from torch import nn

from megagen.specs.video.model import VideoArch, VideoTransformer


class UpsamplerTransformer(VideoTransformer):
    """tokens (B, S, 2·patch_dim) = [noisy ; low-res] patches, pos_ids, t, text → velocity (B, S, p)."""

    def __init__(self, arch: VideoArch):
        super().__init__(arch)
        self.patch_embed = nn.Linear(2 * arch.patch_dim, arch.dim, bias=True)

    def init_weights(self, std: float = 0.02) -> None:
        """The video transformer's init, with zero weights on the conditioning latent's inputs."""
        super().init_weights(std)
        with torch.no_grad():
            self.patch_embed.weight[:, self.arch.patch_dim :].zero_()


POSITION_TABLES = ("pos_t.weight", "pos_h.weight", "pos_w.weight")


def upsampler_from_parent(
    parent: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The upsampler state dict that starts from a video transformer's weights `parent`, in memory.

    `target` is a freshly initialised upsampler's state dict (it supplies the shapes and every entry the
    parent cannot). Equal shapes are copied; `patch_embed.weight` (d, p) grows to (d, 2p) with zeros in the
    new input columns; position tables keep the parent's rows and the fresh init beyond them (the
    upsampler's high-resolution grids are larger). Anything else that disagrees is an error. This is what
    `checkpoint.init_from` does from a saved video run (its upsampler growth rules).
    """
    out = {}
    for name, fresh in target.items():
        if name not in parent:
            raise KeyError(f"the parent state dict has no {name!r}")
        src = parent[name]
        if src.shape == fresh.shape:
            out[name] = src.detach().clone().to(fresh.dtype)
        elif (
            name == "patch_embed.weight" and src.shape[0] == fresh.shape[0] and src.shape[1] < fresh.shape[1]
        ):
            grown = torch.zeros_like(fresh)
            grown[:, : src.shape[1]] = src
            out[name] = grown
        elif name in POSITION_TABLES and src.shape[1:] == fresh.shape[1:] and src.shape[0] <= fresh.shape[0]:
            grown = fresh.detach().clone()
            grown[: src.shape[0]] = src
            out[name] = grown
        else:
            raise ValueError(f"{name}: parent shape {tuple(src.shape)} cannot become {tuple(fresh.shape)}")
    return out
