"""Decode latents with the TAE into what a person looks at: one MP4 per sample and one contact sheet.

`megagen sample --tae` and `megagen data stats --render` share this, so a sampled video and a training
sample are decoded, scaled and written the same way and can be compared side by side."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from megagen.errors import ConfigError
from megagen.media.contact_sheet import frame_picks, write_contact_sheet
from megagen.media.video_file import write_video
from megagen.specs.tae.load import load_tae
from megagen.specs.tae.tiling import decode_tiled

CONTACT_SHEET = "contact_sheet.png"


def load_decoder(path, latent_shape: Sequence[int], producer: str, key: str = "--tae", device: str = "cpu"):
    """The TAE at `path`, refused (naming both) when it cannot decode latents of `latent_shape`
    (B, C, T, H, W) made by `producer`: checked before any sampling or decoding is spent."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(key, f"{p} does not exist")
    if len(latent_shape) != 5:
        raise ConfigError(
            key, f"a TAE decodes video latents (B, C, T, H, W); {producer} makes {tuple(latent_shape)}"
        )
    tae, info = load_tae(p, device=device)
    channels = info.get("latent_channels")
    if channels != latent_shape[1]:
        raise ConfigError(
            key,
            f"TAE {p} ({info.get('preset', '?')}) decodes {channels} latent channels; "
            f"{producer} makes {latent_shape[1]}",
        )
    return tae


def to_uint8_frames(video: torch.Tensor) -> list[np.ndarray]:
    """(B, 3, T, H, W) in [-1, 1] -> one (T, H, W, 3) uint8 array per sample (the writers' layout)."""
    pixels = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [np.ascontiguousarray(clip.permute(1, 2, 3, 0).cpu().numpy()) for clip in pixels]


def render_latents(
    tae, latents: torch.Tensor, out_dir, fps: float | Sequence[float], stem: str = "sample", columns: int = 8
) -> list[str]:
    """Decode (B, C, T', H', W') latents (tiled) and write `<stem>_<i>.mp4` per sample and the contact
    sheet into `out_dir`; returns the names written (a missing PyAV / Pillow skips its files). Samples are
    decoded one at a time and only the sheet's frames are kept, so memory holds one decoded video."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weight = next(tae.parameters())
    rates = list(fps) if isinstance(fps, Sequence) else [fps] * len(latents)
    written, stills = [], []
    for i, rate in enumerate(rates):
        with torch.no_grad():
            video = decode_tiled(tae, latents[i : i + 1].to(device=weight.device, dtype=weight.dtype))
        (clip,) = to_uint8_frames(video)
        name = f"{stem}_{i:03d}.mp4"
        if write_video(out / name, clip, rate):
            written.append(name)
        stills.append(clip[frame_picks(len(clip), columns)])
    if write_contact_sheet(out / CONTACT_SHEET, stills, columns=columns):
        written.append(CONTACT_SHEET)
    return written
