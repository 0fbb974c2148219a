"""The Wan 2.1 spec: presets, parallel plan, and the map between megagen's objective and Wan's.

megagen's flow matching runs t from 0 (noise x0) to 1 (data x1) and regresses v = x1 − (1 − σ_min)·x0.
Wan's model takes σ = 1 − t as `timestep = σ · 1000` and predicts noise − data = −v. So `model_inputs`
passes (1 − t)·1000, and the token space of this spec is Wan's prediction: `to_tokens` negates the
velocity, `from_tokens` negates back; loss and sampler see megagen's convention unchanged.
Wan's timestep shift σ' = sσ / (1 + (s − 1)σ) is a shift of logit(σ) by ln s: in training it is
`train.t_mean = −ln s` (t = sigmoid(t_mean + t_std·z)); in sampling the spec shifts its schedule.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from megagen.config import Config, ConfigError
from megagen.metrics.flops import FlopCount, attention_products, combine, linear
from megagen.parallel.plan import ParallelPlan, TPRegion
from megagen.specs.base import ModelSpec
from megagen.specs.registry import register_spec
from megagen.specs.video.spec import grid_positions, patchify
from megagen.specs.wan.model import WanArch, WanTransformer

TEXT = "umt5"
"""The one condition: umT5-XXL embeddings (`text.umt5`, `text_valid.umt5`)."""

WAN_PRESETS: dict[str, WanArch] = {
    "tiny": WanArch(layers=2, dim=64, ffn=128, heads=4, text_dim=32),
    "1.3b": WanArch(layers=30, dim=1536, ffn=8960, heads=12),
    "14b": WanArch(layers=40, dim=5120, ffn=13824, heads=40),
}

SAMPLE_SHIFT = 5.0
"""Wan's default timestep shift for text-to-video sampling (its `sample_shift`)."""


def patchify_channels_last(latents: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """(B, C, T, H, W) → (B, T'·H'·W', pt·ph·pw·C): the feature order of Wan's `proj_out`."""
    b, c, t, h, w = latents.shape
    pt, ph, pw = patch
    x = latents.reshape(b, c, t // pt, pt, h // ph, ph, w // pw, pw)
    return x.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(b, -1, pt * ph * pw * c)


def unpatchify_channels_last(
    tokens: torch.Tensor, patch: tuple[int, int, int], latent_shape: tuple[int, ...]
) -> torch.Tensor:
    """Inverse of `patchify_channels_last` for latents of shape (C, T, H, W)."""
    c, t, h, w = latent_shape
    pt, ph, pw = patch
    x = tokens.reshape(tokens.shape[0], t // pt, h // ph, w // pw, pt, ph, pw, c)
    return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(tokens.shape[0], c, t, h, w)


def shifted_schedule(steps: int, shift: float) -> torch.Tensor:
    """megagen t from 0 to 1 in `steps` steps, uniform in Wan's shifted σ (σ' = sσ / (1 + (s − 1)σ))."""
    sigma = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    shifted = shift * sigma / (1 + (shift - 1) * sigma)
    return (1 - shifted).float()


class WanSpec(ModelSpec):
    """Wan 2.1 text-to-video (diffusers' `WanTransformer3DModel`) over 16-channel Wan-VAE latents."""

    name = "wan"
    presets = WAN_PRESETS
    _patch = (1, 2, 2)  # every preset's; to_tokens / from_tokens get no config

    def build(self, cfg: Config) -> nn.Module:
        return WanTransformer(self.arch(cfg))

    def parallel_plan(self, cfg: Config) -> ParallelPlan:
        arch: WanArch = self.arch(cfg)
        return ParallelPlan(
            blocks="blocks",
            colwise=("blocks.*.attn.[qkv]", "blocks.*.cross_attn.[qkv]", "blocks.*.mlp.w1"),
            rowwise=("blocks.*.attn.o", "blocks.*.cross_attn.o", "blocks.*.mlp.w2"),
            regions={
                "blocks.*.attn": TPRegion(seq_args=("x", "rope")),
                "blocks.*.cross_attn": TPRegion(
                    seq_args=("x",), replicated_args=("context",), token_wise=True
                ),
                "blocks.*.mlp": TPRegion(seq_args=("x",), token_wise=True),
            },
            sharded_norms=("blocks.*.attn.[qk]_norm", "blocks.*.cross_attn.[qk]_norm"),
            self_attention=("blocks.*.attn.core",),
            sequence_inputs={"tokens": 1, "pos_ids": 1},
            token_mask="token_valid",
            sequence_output_dim=1,
            head_counts={"self-attention": arch.heads},
        )

    def latent_shape(self, cfg: Config) -> tuple[int, int, int, int]:
        arch: WanArch = self.arch(cfg)
        return (arch.latent_channels, cfg.data.latent_frames, cfg.data.latent_height, cfg.data.latent_width)

    def sample_shapes(self, cfg: Config) -> dict[str, tuple[int, ...]]:
        arch: WanArch = self.arch(cfg)
        return {"latents": self.latent_shape(cfg), f"text.{TEXT}": (cfg.data.text_tokens, arch.text_dim)}

    def condition_names(self, cfg: Config) -> list[str]:
        return [TEXT]

    def validate(self, cfg: Config) -> None:
        arch: WanArch = self.arch(cfg)
        tp, cp = cfg.parallel.tp, cfg.parallel.cp
        if arch.heads % tp:
            raise ConfigError(
                "parallel.tp", f"{tp} does not divide the {arch.heads} heads of wan/{cfg.model.preset}"
            )
        if cfg.parallel.cp_kind == "ulysses" and arch.heads % (tp * cp):
            raise ConfigError(
                "parallel.cp",
                f"ulysses needs heads ({arch.heads}) divisible by cp*tp = {cp}*{tp}; "
                "use cp_kind=allgather_kv",
            )
        dims = {
            "data.latent_frames": cfg.data.latent_frames,
            "data.latent_height": cfg.data.latent_height,
            "data.latent_width": cfg.data.latent_width,
        }
        for (key, size), p in zip(dims.items(), arch.patch):
            if size % p:
                raise ConfigError(key, f"{size} is not divisible by the patch size {p}")
            if size // p > arch.rope_max_seq_len:
                raise ConfigError(key, f"{size} exceeds the {arch.rope_max_seq_len} rotary positions")

    def flops_per_sample(
        self, cfg: Config, latent_shape: tuple[int, ...] | None = None, text_tokens: int | None = None
    ) -> FlopCount:
        """FLOPs of one sample of `latent_shape` (C, T, H, W) with `text_tokens` umT5 tokens."""
        arch: WanArch = self.arch(cfg)
        c, t, h, w = latent_shape or self.latent_shape(cfg)
        pt, ph, pw = arch.patch
        s = (t // pt) * (h // ph) * (w // pw)
        lc = cfg.data.text_tokens if text_tokens is None else text_tokens
        d, f = arch.dim, arch.ffn
        inputs = (
            linear(s, arch.patch_dim, d)
            + linear(lc, arch.text_dim, d)
            + linear(lc, d, d)  # the text projection's two layers
            + linear(1, arch.freq_dim, d)
            + linear(1, d, d)  # the timestep MLP
        )
        outside = inputs + linear(1, d, 6 * d) + linear(s, d, arch.patch_dim)
        block_matmuls = (
            linear(s, d, 4 * d)  # self-attention q, k, v, o
            + linear(s, d, 2 * d)  # cross-attention q and o
            + linear(lc, d, 2 * d)  # cross-attention k, v over the text tokens
            + linear(s, d, f)
            + linear(s, f, d)
        )
        block_attention = attention_products(s, s, d) + attention_products(s, lc, d)
        return combine(outside, block_matmuls, block_attention, arch.layers, cfg.train.recompute, inputs)

    def to_tokens(self, latents: torch.Tensor) -> torch.Tensor:
        """megagen velocity (B, C, T, H, W) → Wan's prediction tokens (noise − data: the negation)."""
        return patchify_channels_last(-latents, self._patch)

    def from_tokens(self, tokens: torch.Tensor, latent_shape: tuple[int, ...]) -> torch.Tensor:
        """Wan's prediction tokens → megagen velocity (the inverse of `to_tokens`)."""
        return -unpatchify_channels_last(tokens, self._patch, latent_shape)

    def model_inputs(
        self,
        batch: dict[str, torch.Tensor],
        x_t: torch.Tensor,
        t: torch.Tensor,
        drop: dict[str, torch.Tensor] | None,
    ) -> dict[str, Any]:
        grid = tuple(n // p for n, p in zip(x_t.shape[2:], self._patch))
        return {
            "tokens": patchify(x_t, self._patch),
            "pos_ids": grid_positions(grid, x_t.device),
            "timestep": (1 - t) * 1000,
            "text": batch[f"text.{TEXT}"],
            "text_valid": batch.get(f"text_valid.{TEXT}"),
            "text_drop": None if drop is None else drop.get(TEXT),
        }

    def sampling_start(
        self, cfg: Config, batch: dict[str, torch.Tensor], steps: int, generator: torch.Generator | None
    ):
        """The default start with Wan's shifted schedule in place of Movie Gen's linear-quadratic one."""
        noise, keep, drop, _ = super().sampling_start(cfg, batch, steps, generator)
        return noise, keep, drop, shifted_schedule(steps, SAMPLE_SHIFT)


WAN_SPEC = register_spec(WanSpec())
