"""The Movie Gen Video spec: presets, parallel plan, batch → model inputs, patchify."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from megagen.config import Config, ConfigError
from megagen.metrics.flops import FlopCount, attention_products, combine, linear
from megagen.parallel.plan import ParallelPlan, TPRegion
from megagen.specs.base import ModelSpec
from megagen.specs.registry import register_spec
from megagen.specs.video.model import VideoArch, VideoTransformer

TINY_TEXT = {"ul2": 24, "byt5": 16, "metaclip": 12}

VIDEO_PRESETS: dict[str, VideoArch] = {
    "tiny": VideoArch(
        layers=2, dim=64, ffn=128, heads=8, max_latent_thw=(16, 32, 32), text_encoders=TINY_TEXT
    ),
    # CPU benchmarks (benchmarks/overlap.py): wide enough that GEMMs, not call overheads, set the step time
    "small": VideoArch(
        layers=2, dim=512, ffn=1536, heads=8, max_latent_thw=(16, 32, 32), text_encoders=TINY_TEXT
    ),
    "1b": VideoArch(layers=24, dim=1536, ffn=4096, heads=16),
    "5b": VideoArch(layers=32, dim=3072, ffn=8192, heads=24),
    "30b": VideoArch(layers=48, dim=6144, ffn=16384, heads=48),
}


def patchify(latents: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """(B, C, T, H, W) → (B, T'·H'·W', C·pt·ph·pw), tokens in t-major, then h, then w order."""
    b, c, t, h, w = latents.shape
    pt, ph, pw = patch
    x = latents.reshape(b, c, t // pt, pt, h // ph, ph, w // pw, pw)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(b, (t // pt) * (h // ph) * (w // pw), c * pt * ph * pw)


def unpatchify(
    tokens: torch.Tensor, patch: tuple[int, int, int], latent_shape: tuple[int, ...]
) -> torch.Tensor:
    """Inverse of `patchify` for latents of shape (C, T, H, W)."""
    c, t, h, w = latent_shape
    pt, ph, pw = patch
    b = tokens.shape[0]
    x = tokens.reshape(b, t // pt, h // ph, w // pw, c, pt, ph, pw)
    x = x.permute(0, 4, 1, 5, 2, 6, 3, 7)
    return x.reshape(b, c, t, h, w)


def grid_positions(grid: tuple[int, int, int], device: torch.device | None = None) -> torch.Tensor:
    """(1, T'·H'·W', 3) integer (t, h, w) patch coordinates in `patchify` order."""
    axes = [torch.arange(n, device=device) for n in grid]
    tt, hh, ww = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([tt, hh, ww], dim=-1).reshape(1, -1, 3)


class VideoSpec(ModelSpec):
    """Movie Gen Video: text-to-video flow-matching transformer over 16-channel TAE latents."""

    name = "video"
    presets = VIDEO_PRESETS

    def build(self, cfg: Config) -> nn.Module:
        return VideoTransformer(self.arch(cfg))

    def parallel_plan(self, cfg: Config) -> ParallelPlan:
        arch: VideoArch = self.arch(cfg)
        return ParallelPlan(
            blocks="blocks",
            colwise=("blocks.*.attn.[qkv]", "blocks.*.cross_attn.[qkv]", "blocks.*.mlp.w[13]"),
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
            head_counts={"self-attention": arch.heads},
        )

    def latent_shape(self, cfg: Config) -> tuple[int, int, int, int]:
        arch: VideoArch = self.arch(cfg)
        return (arch.latent_channels, cfg.data.latent_frames, cfg.data.latent_height, cfg.data.latent_width)

    def sample_shapes(self, cfg: Config) -> dict[str, tuple[int, ...]]:
        arch: VideoArch = self.arch(cfg)
        shapes: dict[str, tuple[int, ...]] = {"latents": self.latent_shape(cfg)}
        for name, width in arch.text_encoders.items():
            shapes[f"text.{name}"] = (cfg.data.text_tokens, width)
        return shapes

    def condition_names(self, cfg: Config) -> list[str]:
        return list(self.arch(cfg).text_encoders)

    def validate(self, cfg: Config) -> None:
        arch: VideoArch = self.arch(cfg)
        tp, cp = cfg.parallel.tp, cfg.parallel.cp
        if arch.heads % tp:
            raise ConfigError(
                "parallel.tp", f"{tp} does not divide the {arch.heads} heads of video/{cfg.model.preset}"
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
        for (key, size), p, limit in zip(dims.items(), arch.patch, arch.max_latent_thw):
            if size % p:
                raise ConfigError(key, f"{size} is not divisible by the patch size {p}")
            if size > limit:
                raise ConfigError(key, f"{size} exceeds the preset's maximum {limit}")

    def flops_per_sample(
        self, cfg: Config, latent_shape: tuple[int, ...] | None = None, text_tokens: int | None = None
    ) -> FlopCount:
        """FLOPs of one sample of `latent_shape` (C, T, H, W) with `text_tokens` per encoder."""
        arch: VideoArch = self.arch(cfg)
        c, t, h, w = latent_shape or self.latent_shape(cfg)
        pt, ph, pw = arch.patch
        s = (t // pt) * (h // ph) * (w // pw)
        per_encoder = cfg.data.text_tokens if text_tokens is None else text_tokens
        lc = per_encoder * len(arch.text_encoders)
        d, f = arch.dim, arch.ffn
        inputs = (
            linear(s, arch.patch_dim, d)
            + sum(linear(per_encoder, k, d) for k in arch.text_encoders.values())
            + linear(1, 256, d)  # timestep MLP on sinusoidal features
        )
        outside = inputs + linear(1, d, d) + linear(1, d, 6 * d) + linear(s, d, arch.patch_dim)
        block_matmuls = (
            linear(s, d, 3 * d)  # self-attention q, k, v
            + linear(s, d, d)  # self-attention o
            + linear(s, d, 2 * d)  # cross-attention q and o
            + linear(lc, d, 2 * d)  # cross-attention k, v over the text tokens
            + linear(s, d, 2 * f)  # w1, w3
            + linear(s, f, d)  # w2
        )
        block_attention = attention_products(s, s, d) + attention_products(s, lc, d)
        return combine(outside, block_matmuls, block_attention, arch.layers, cfg.train.recompute, inputs)

    def to_tokens(self, latents: torch.Tensor) -> torch.Tensor:
        return patchify(latents, self._patch)

    _patch = (1, 2, 2)

    def from_tokens(self, tokens: torch.Tensor, latent_shape: tuple[int, ...]) -> torch.Tensor:
        return unpatchify(tokens, self._patch, latent_shape)

    def model_inputs(
        self,
        batch: dict[str, torch.Tensor],
        x_t: torch.Tensor,
        t: torch.Tensor,
        drop: dict[str, torch.Tensor] | None,
    ) -> dict[str, Any]:
        grid = tuple(n // p for n, p in zip(x_t.shape[2:], self._patch))
        text = {k.split(".", 1)[1]: v for k, v in batch.items() if k.startswith("text.")}
        valid = {k.split(".", 1)[1]: v for k, v in batch.items() if k.startswith("text_valid.")}
        return {
            "tokens": patchify(x_t, self._patch),
            "pos_ids": grid_positions(grid, x_t.device),
            "t": t,
            "text": text,
            "text_valid": valid or None,
            "text_drop": drop,
        }


VIDEO_SPEC = register_spec(VideoSpec())
