"""The Movie Gen spatial-upsampler spec: the video spec plus a low-res-conditioned latent on channels.

Data: `latents` is the high-resolution TAE latent (C, T, H, W); `lowres_latents` is the low-resolution
video upsampled in pixel space and encoded upstream, so it has the same shape. Text conditions, patchify,
the parallel plan and the validation are the video spec's. Sampling: MultiDiffusion over latent frames
(windows of 14 latent frames overlapping by 4, uniform weights: see `multidiffusion.py`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from megagen.config import Config
from megagen.metrics.flops import FlopCount, linear
from megagen.specs.registry import register_spec
from megagen.specs.upsampler.model import UpsamplerTransformer
from megagen.specs.upsampler.multidiffusion import multidiffusion_sample
from megagen.specs.video.model import VideoArch
from megagen.specs.video.spec import TINY_TEXT, VideoSpec, patchify

LOWRES = "lowres_latents"

UPSAMPLER_PRESETS: dict[str, VideoArch] = {
    "tiny": VideoArch(
        layers=2, dim=64, ffn=128, heads=8, max_latent_thw=(32, 32, 32), text_encoders=TINY_TEXT
    ),
    # 32 layers, d 3584 (28 heads of 128), SwiGLU FFN 10240: 6.93 B parameters (7 B ± 5%); latent grids
    # up to 32 × 136 × 240 (1088 × 1920 pixels through the 8× TAE).
    "7b": VideoArch(layers=32, dim=3584, ffn=10240, heads=28, max_latent_thw=(32, 136, 240)),
}


class UpsamplerSpec(VideoSpec):
    """Video-to-video spatial upsampler over 16-channel TAE latents, initialisable from a video model."""

    name = "upsampler"
    presets = UPSAMPLER_PRESETS
    window = 14
    """MultiDiffusion window, in latent frames."""
    overlap = 4
    """Latent frames shared by neighbouring windows."""
    window_weights = "uniform"

    def build(self, cfg: Config) -> nn.Module:
        return UpsamplerTransformer(self.arch(cfg))

    def sample_shapes(self, cfg: Config) -> dict[str, tuple[int, ...]]:
        shapes = super().sample_shapes(cfg)
        shapes[LOWRES] = shapes["latents"]
        return shapes

    def model_inputs(
        self,
        batch: dict[str, torch.Tensor],
        x_t: torch.Tensor,
        t: torch.Tensor,
        drop: dict[str, torch.Tensor] | None,
    ) -> dict[str, Any]:
        inputs = super().model_inputs(batch, x_t, t, drop)
        lowres = batch[LOWRES].to(x_t.dtype)
        if lowres.shape != x_t.shape:
            raise ValueError(
                f"{LOWRES} has shape {tuple(lowres.shape)} but the high-res latents {tuple(x_t.shape)}"
            )
        inputs["tokens"] = torch.cat([inputs["tokens"], patchify(lowres, self._patch)], dim=-1)
        return inputs

    def flops_per_sample(
        self, cfg: Config, latent_shape: tuple[int, ...] | None = None, text_tokens: int | None = None
    ) -> FlopCount:
        """The video count plus the patch embedding's second half (reading the low-res latent)."""
        base = super().flops_per_sample(cfg, latent_shape, text_tokens)
        arch: VideoArch = self.arch(cfg)
        _, t, h, w = latent_shape or self.latent_shape(cfg)
        pt, ph, pw = arch.patch
        extra = linear((t // pt) * (h // ph) * (w // pw), arch.patch_dim, arch.dim)
        # an input layer: its backward computes the weight gradient only (forward + 1× more)
        return FlopCount(base.forward + extra, base.model + 2 * extra, base.hardware + 2 * extra)

    def sample(
        self,
        model: nn.Module,
        cfg: Config,
        batch: dict[str, torch.Tensor],
        steps: int = 50,
        cfg_scale: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """MultiDiffusion over latent frames: windows of 14 overlapping by 4, averaged at every step."""

        def slice_batch(b: dict[str, torch.Tensor], span: tuple[int, int]) -> dict[str, torch.Tensor]:
            lo, hi = span
            out = dict(b)
            for key in ("latents", LOWRES):
                out[key] = b[key][:, :, lo:hi]
            return out

        return multidiffusion_sample(
            self,
            model,
            cfg,
            batch,
            slice_batch,
            dim=2,
            window=self.window,
            overlap=self.overlap,
            kind=self.window_weights,
            steps=steps,
            cfg_scale=cfg_scale,
            generator=generator,
        )


UPSAMPLER_SPEC = register_spec(UpsamplerSpec())
