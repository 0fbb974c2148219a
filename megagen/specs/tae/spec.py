"""The TAE spec: Movie Gen's temporal autoencoder trained by `megagen train` with its own loss.

Data: the shards' `latents` field holds the *pixel* video (3, T, H, W) in [-1, 1] (an image is T = 1);
`data.latent_frames/height/width` are therefore pixel sizes for this spec (`megagen data synth --preset
tae_tiny` writes such shards). There is no text and no diffusion: `training_loss` is the TAE's loss
(loss.py) and sampling is refused. Parallelism: FSDP/HSDP with the encoder's and decoder's stages as the
units; convolutions have no tensor- or context-parallel plan, so `parallel.tp` and `parallel.cp` must be 1.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from megagen.config import Config, ConfigError
from megagen.metrics.flops import FlopCount
from megagen.parallel.plan import ParallelPlan
from megagen.specs.base import ModelSpec
from megagen.specs.registry import register_spec
from megagen.specs.tae.loss import LossWeights, tae_loss_per_sample
from megagen.specs.tae.model import TAE, TAEArch

TAE_PRESETS: dict[str, TAEArch] = {
    # tests and CPU examples: ~84 K parameters, a 32x32x16 clip in tens of milliseconds
    "tiny": TAEArch(channels=(8, 8, 16, 16), blocks_per_level=1, groups=4, heads=1),
    # full size: the widths and depth of a latent-diffusion image VAE (128/256/512/512, two ResBlocks per
    # level) with every conv made 2.5D and temporal attention beside the spatial one; ~100 M parameters
    "base": TAEArch(channels=(128, 256, 512, 512), blocks_per_level=2, groups=32, heads=1),
}

_EPS_STREAM = 5
"""`sample_seed` stream of the posterior's reparameterisation noise (flow matching uses 2-4)."""


class TAESpec(ModelSpec):
    """video (3, T, H, W) → 16-channel latents at 8x in t, h, w → video; KL + OPL."""

    name = "tae"
    presets = TAE_PRESETS

    def build(self, cfg: Config) -> nn.Module:
        return TAE(self.arch(cfg))

    def parallel_plan(self, cfg: Config) -> ParallelPlan:
        return ParallelPlan(blocks="blocks")

    def latent_shape(self, cfg: Config) -> tuple[int, int, int, int]:
        """The shape of a data sample's `latents` field, which for the TAE is the pixel clip (3, T, H, W)."""
        return (3, cfg.data.latent_frames, cfg.data.latent_height, cfg.data.latent_width)

    def sample_shapes(self, cfg: Config) -> dict[str, tuple[int, ...]]:
        return {"latents": self.latent_shape(cfg)}

    def condition_names(self, cfg: Config) -> list[str]:
        return []

    def validate(self, cfg: Config) -> None:
        for key, size in (("parallel.tp", cfg.parallel.tp), ("parallel.cp", cfg.parallel.cp)):
            if size != 1:
                raise ConfigError(key, f"{size}: the TAE has no tensor/context-parallel plan; use FSDP/HSDP")
        factor = self.arch(cfg).compression[1]
        for key in ("data.latent_height", "data.latent_width"):
            size = getattr(cfg.data, key.split(".")[1])
            if size % factor:
                raise ConfigError(key, f"{size} pixels is not a multiple of the TAE's {factor}x compression")
        if cfg.eval.every > 0:
            raise ConfigError("eval.every", "held-out evaluation is flow matching's; the TAE has none yet")

    def loss_weights_of(self, cfg: Config) -> LossWeights:
        t = cfg.tae
        return LossWeights(t.kl_weight, t.opl_weight, t.opl_radius, t.perceptual_weight)

    def training_loss(self, cfg: Config, model: nn.Module, batch, req, runtime, sample_valid=None):
        """(sum over this rank's samples of the per-sample loss, 1): the trainer divides by the global batch.

        z = mean + σ·ε with ε drawn per sample from (run.seed, step, sample position), so every mesh
        draws the same noise for the same sample."""
        from megagen.specs.tae.perceptual import perceptual_features

        video = batch["latents"]
        mean_shape = latent_shape_of(self.arch(cfg), tuple(video.shape[1:]))
        eps = _posterior_noise(cfg.run.seed, req.step, list(req.positions), mean_shape).to(video.device)
        recon, mean, logvar = model(video, eps)
        features = perceptual_features(cfg.tae.perceptual_weights, video.device)
        per_sample = tae_loss_per_sample(recon, video, mean, logvar, self.loss_weights_of(cfg), features)
        total = per_sample["total"]
        if sample_valid is not None:
            total = torch.where(sample_valid.to(total.device), total, torch.zeros_like(total))
        return total.sum(), 1

    def flops_per_sample(
        self, cfg: Config, latent_shape: tuple[int, ...] | None = None, text_tokens: int | None = None
    ) -> FlopCount:
        """Convolution and attention FLOPs of one (3, T, H, W) clip, counted on the meta device."""
        from megagen.specs.tae.flops import tae_flops

        shape = latent_shape or self.sample_shapes(cfg)["latents"]
        return tae_flops(self.arch(cfg), tuple(shape), cfg.train.recompute)

    def to_tokens(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("the TAE is not a diffusion model: it has no token targets")

    def from_tokens(self, tokens: torch.Tensor, latent_shape: tuple[int, ...]) -> torch.Tensor:
        raise NotImplementedError("the TAE is not a diffusion model: it has no token targets")

    def model_inputs(self, batch, x_t, t, drop) -> dict[str, Any]:
        raise NotImplementedError("the TAE is not a diffusion model: use encode_tiled / decode_tiled")

    def sample(self, model, cfg, batch, steps=50, cfg_scale=1.0, generator=None) -> torch.Tensor:
        raise ConfigError("model.spec", "the TAE does not sample; it encodes and decodes (see docs/tae.md)")


def latent_shape_of(arch: TAEArch, video_shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """(16, ceil(T/8), H/8, W/8) for a (3, T, H, W) clip."""
    _, t, h, w = video_shape
    ft, fh, fw = arch.compression
    return (arch.latent_channels, -(-t // ft), h // fh, w // fw)


def _posterior_noise(seed: int, step: int, positions: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    from megagen.data.synthetic import sample_seed

    draws = []
    for i in positions:
        gen = torch.Generator().manual_seed(sample_seed(seed, step, i, _EPS_STREAM))
        draws.append(torch.randn(shape, generator=gen))
    return torch.stack(draws)


TAE_SPEC = register_spec(TAESpec())
