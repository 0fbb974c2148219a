"""The `video_dit` spec: everything megagen needs to train, shard and sample `VideoDiT`.

Registered by the entry point in this package's pyproject.toml (group `megagen.specs`); no megagen file
names it. Data: 16-channel video latents (C, T, H, W) and one text encoder, `text.t5` (L, text_dim), with
an optional `text_valid.t5` (L,) key mask.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from megagen.config import Config, ConfigError
from megagen.metrics.flops import FlopCount, attention_products, combine, linear
from megagen.parallel.plan import ParallelPlan, TPRegion
from megagen.specs import ModelSpec
from megagen_plugin_example.model import DiTArch, VideoDiT

PRESETS: dict[str, DiTArch] = {
    "tiny": DiTArch(layers=2, dim=64, ffn=256, heads=8, max_latent_thw=(16, 32, 32), text_dim=32),
    "xl": DiTArch(layers=28, dim=1152, ffn=4608, heads=16),  # DiT-XL widths, plus cross-attention
}
TEXT = "t5"


def patchify(latents: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """(B, C, T, H, W) → (B, T'·H'·W', C·pt·ph·pw), tokens in t, h, w order."""
    b, c, t, h, w = latents.shape
    pt, ph, pw = patch
    x = latents.reshape(b, c, t // pt, pt, h // ph, ph, w // pw, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(b, (t // pt) * (h // ph) * (w // pw), c * pt * ph * pw)


def unpatchify(tokens: torch.Tensor, patch: tuple[int, int, int], shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `patchify` for one latent shape (C, T, H, W)."""
    c, t, h, w = shape
    pt, ph, pw = patch
    x = tokens.reshape(tokens.shape[0], t // pt, h // ph, w // pw, c, pt, ph, pw)
    return x.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(tokens.shape[0], c, t, h, w)


def grid_positions(grid: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """(1, T'·H'·W', 3) integer patch coordinates in `patchify` order."""
    axes = [torch.arange(n, device=device) for n in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(1, -1, 3)


class VideoDiTSpec(ModelSpec):
    """DiT-style video transformer (per-block adaLN, LayerNorm, GELU MLP) — the megagen plug-in example."""

    name = "video_dit"
    presets = PRESETS
    patch = (1, 2, 2)  # the same for every preset: to_tokens/from_tokens get no config

    def build(self, cfg: Config) -> nn.Module:
        return VideoDiT(self.arch(cfg))

    # init_weights: the base class calls model.init_weights(cfg.model.init_std)

    def parallel_plan(self, cfg: Config) -> ParallelPlan:
        return ParallelPlan(
            blocks="blocks",
            colwise=("blocks.*.attn.[qkv]", "blocks.*.cross_attn.[qkv]", "blocks.*.mlp.w1"),
            rowwise=("blocks.*.attn.o", "blocks.*.cross_attn.o", "blocks.*.mlp.w2"),
            regions={
                "blocks.*.attn": TPRegion(seq_args=("x",)),
                "blocks.*.cross_attn": TPRegion(
                    seq_args=("x",), replicated_args=("context",), token_wise=True
                ),
                "blocks.*.mlp": TPRegion(seq_args=("x",), token_wise=True),
            },
            self_attention=("blocks.*.attn.core",),
            sequence_inputs={"tokens": 1, "pos_ids": 1},
            token_mask="token_valid",
            sequence_output_dim=1,
            head_counts={"self-attention": self.arch(cfg).heads},
        )

    def latent_shape(self, cfg: Config) -> tuple[int, int, int, int]:
        d = cfg.data
        return (self.arch(cfg).latent_channels, d.latent_frames, d.latent_height, d.latent_width)

    def sample_shapes(self, cfg: Config) -> dict[str, tuple[int, ...]]:
        text = (cfg.data.text_tokens, self.arch(cfg).text_dim)
        return {"latents": self.latent_shape(cfg), f"text.{TEXT}": text}

    def condition_names(self, cfg: Config) -> list[str]:
        return [TEXT]

    def model_inputs(
        self,
        batch: dict[str, torch.Tensor],
        x_t: torch.Tensor,
        t: torch.Tensor,
        drop: dict[str, torch.Tensor] | None,
    ) -> dict[str, Any]:
        grid = tuple(n // p for n, p in zip(x_t.shape[2:], self.patch))
        return {
            "tokens": patchify(x_t, self.patch),  # sequence input (dim 1): sharded by the engine
            "pos_ids": grid_positions(grid, x_t.device),  # sequence input (dim 1)
            "t": t,
            "text": batch[f"text.{TEXT}"],
            "text_valid": batch.get(f"text_valid.{TEXT}"),
            "text_drop": None if drop is None else drop[TEXT],
        }

    def to_tokens(self, latents: torch.Tensor) -> torch.Tensor:
        return patchify(latents, self.patch)

    def from_tokens(self, tokens: torch.Tensor, latent_shape: tuple[int, ...]) -> torch.Tensor:
        return unpatchify(tokens, self.patch, latent_shape)

    def validate(self, cfg: Config) -> None:
        arch: DiTArch = self.arch(cfg)
        tp, cp = cfg.parallel.tp, cfg.parallel.cp
        if arch.heads % tp:
            raise ConfigError("parallel.tp", f"{tp} does not divide the {arch.heads} heads of {self.name}")
        if cfg.parallel.cp_kind == "ulysses" and arch.heads % (tp * cp):
            raise ConfigError("parallel.cp", f"ulysses needs {arch.heads} heads divisible by cp*tp={cp * tp}")
        sizes = {"data.latent_frames": cfg.data.latent_frames, "data.latent_height": cfg.data.latent_height}
        sizes["data.latent_width"] = cfg.data.latent_width
        for (key, size), p, limit in zip(sizes.items(), self.patch, arch.max_latent_thw):
            if size % p or size > limit:
                raise ConfigError(key, f"{size} must be a multiple of {p} and at most {limit}")

    def flops_per_sample(
        self, cfg: Config, latent_shape: tuple[int, ...] | None = None, text_tokens: int | None = None
    ) -> FlopCount:
        arch: DiTArch = self.arch(cfg)
        _, t, h, w = latent_shape or self.latent_shape(cfg)
        s = (t // self.patch[0]) * (h // self.patch[1]) * (w // self.patch[2])
        lc = cfg.data.text_tokens if text_tokens is None else text_tokens
        d, f = arch.dim, arch.ffn
        inputs = linear(s, arch.patch_dim, d) + linear(lc, arch.text_dim, d) + linear(1, 256, d)
        outside = inputs + linear(lc, d, d) + linear(1, d, d)  # text projection 2, timestep MLP 2
        outside += linear(1, d, 2 * d) + linear(s, d, arch.patch_dim)  # output adaLN and projection
        block = (
            linear(s, d, 4 * d)  # self-attention q, k, v, o
            + linear(s, d, 2 * d)  # cross-attention q, o
            + linear(lc, d, 2 * d)  # cross-attention k, v
            + linear(s, d, f)
            + linear(s, f, d)  # MLP
            + linear(1, d, 6 * d)  # adaLN
        )
        attention = attention_products(s, s, d) + attention_products(s, lc, d)
        return combine(outside, block, attention, arch.layers, cfg.train.recompute, inputs)


SPEC = VideoDiTSpec()
