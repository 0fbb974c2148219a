"""The Movie Gen Audio spec: presets, parallel plan, context masks, batch → model inputs, long-audio sampler.

Data (docs/data-format.md): `latents` is the DAC-VAE latent (128, T) at 25 Hz, `video_features` the
per-frame video features (Fv, Dv) of the clip, `text.t5` the T5 embedding. The video features are resampled
to the audio rate by linear interpolation over frame centres (both sequences span the same duration) and
added, after a projection, to every audio token.

Masked audio context. A per-frame mask `context_mask` (B, T) (1 = the frame is given as context) selects
the task; the model reads `[x_t ; x1 × mask ; mask]` per frame. In training each sample draws its mask from
the (seed, step, position)-keyed generator of the objective: with the preset's probabilities (default ½,
¼, ¼) *generation* (nothing given), *extension* (a prefix of 1 … T−1 frames given) or *infilling* (a
middle span [a, b), 1 ≤ a < b ≤ T−1, missing; the rest given). The loss covers only the frames to generate:
each such frame's squared error has weight T / (frames to generate) and given frames weight 0, so a
sample's loss is the mean over its generated frames and the trainer's normalisation by B·T averages
samples. Without a `context_mask` in the batch (evaluation, plain sampling) the task is generation.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megagen.config import Config, ConfigError
from megagen.metrics.flops import FlopCount, attention_products, combine, linear
from megagen.parallel.plan import ParallelPlan, TPRegion
from megagen.specs.audio.model import AudioArch, AudioTransformer
from megagen.specs.base import ModelSpec
from megagen.specs.registry import register_spec
from megagen.specs.upsampler.multidiffusion import multidiffusion_sample

VIDEO_FEATURES = "video_features"
CONTEXT_MASK = "context_mask"
TASKS = ("generation", "extension", "infilling")

AUDIO_PRESETS: dict[str, AudioArch] = {
    "tiny": AudioArch(
        layers=2,
        dim=64,
        ffn=256,
        heads=8,
        video_dim=16,
        text_encoders={"t5": 24},
        max_frames=64,
        window=16,
        overlap=4,
    ),
    # Movie Gen Audio 13B: 36 DiT layers, d 4608 (36 heads of 128), GELU FFN 18432.
    "13b": AudioArch(layers=36, dim=4608, ffn=18432, heads=36),
}


def resample_frames(features: torch.Tensor, frames: int) -> torch.Tensor:
    """(B, Fv, D) per-frame features → (B, frames, D) by linear interpolation between frame centres.

    Both sequences cover the same duration: output frame i (centre (i + ½)/frames) reads the input at
    position (i + ½)·Fv/frames − ½, clamped to the ends (`F.interpolate`, align_corners=False).
    """
    if features.shape[1] == frames:
        return features
    out = F.interpolate(features.transpose(1, 2), size=frames, mode="linear", align_corners=False)
    return out.transpose(1, 2)


def draw_context_mask(gen: torch.Generator, frames: int, probs: tuple[float, float, float]) -> torch.Tensor:
    """One sample's (frames,) float mask, 1 = given: generation, extension or infilling (see module doc)."""
    mask = torch.zeros(frames)
    u = float(torch.rand((), generator=gen))
    task = 0 if u < probs[0] else (1 if u < probs[0] + probs[1] else 2)
    a = int(torch.randint(0, 1 << 30, (), generator=gen))
    b = int(torch.randint(0, 1 << 30, (), generator=gen))
    if task == 1 and frames >= 2:  # extension: frames [0, k) given, 1 <= k <= T-1
        mask[: 1 + a % (frames - 1)] = 1
    elif task == 2 and frames >= 3:  # infilling: [lo, hi) missing, 1 <= lo < hi <= T-1
        lo = 1 + a % (frames - 2)
        hi = lo + 1 + b % (frames - 1 - lo)
        mask[:lo] = 1
        mask[hi:] = 1
    return mask


class AudioSpec(ModelSpec):
    """Movie Gen Audio: video- and text-conditioned flow matching over 128-channel DAC-VAE latents."""

    name = "audio"
    presets = AUDIO_PRESETS
    window_weights = "triangular"

    def build(self, cfg: Config) -> nn.Module:
        return AudioTransformer(self.arch(cfg))

    def parallel_plan(self, cfg: Config) -> ParallelPlan:
        arch: AudioArch = self.arch(cfg)
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
            sequence_inputs={"tokens": 1, "video": 1, "pos_ids": 1},
            token_mask="token_valid",
            sequence_output_dim=1,
            head_counts={"self-attention": arch.heads},
        )

    def latent_shape(self, cfg: Config) -> tuple[int, int]:
        return (self.arch(cfg).latent_channels, cfg.data.latent_frames)

    def video_frames(self, cfg: Config, audio_frames: int) -> int:
        """Video frames spanning `audio_frames` latent frames (the synthetic `video_features` length)."""
        arch: AudioArch = self.arch(cfg)
        return max(1, round(audio_frames * arch.video_rate / arch.audio_rate))

    def sample_shapes(self, cfg: Config) -> dict[str, tuple[int, ...]]:
        arch: AudioArch = self.arch(cfg)
        frames = cfg.data.latent_frames
        shapes: dict[str, tuple[int, ...]] = {
            "latents": self.latent_shape(cfg),
            VIDEO_FEATURES: (self.video_frames(cfg, frames), arch.video_dim),
        }
        for name, width in arch.text_encoders.items():
            shapes[f"text.{name}"] = (cfg.data.text_tokens, width)
        return shapes

    def condition_names(self, cfg: Config) -> list[str]:
        return [*self.arch(cfg).text_encoders, "video"]

    def validate(self, cfg: Config) -> None:
        arch: AudioArch = self.arch(cfg)
        tp, cp = cfg.parallel.tp, cfg.parallel.cp
        if arch.heads % tp:
            raise ConfigError(
                "parallel.tp", f"{tp} does not divide the {arch.heads} heads of audio/{cfg.model.preset}"
            )
        if cfg.parallel.cp_kind == "ulysses" and arch.heads % (tp * cp):
            raise ConfigError(
                "parallel.cp",
                f"ulysses needs heads ({arch.heads}) divisible by cp*tp = {cp}*{tp}; "
                "use cp_kind=allgather_kv",
            )
        if cfg.data.latent_frames > arch.max_frames:
            raise ConfigError(
                "data.latent_frames",
                f"{cfg.data.latent_frames} exceeds the preset's maximum {arch.max_frames} latent frames",
            )

    def flops_per_sample(
        self, cfg: Config, latent_shape: tuple[int, ...] | None = None, text_tokens: int | None = None
    ) -> FlopCount:
        """FLOPs of one sample of `latent_shape` (C, T) with `text_tokens` T5 tokens."""
        arch: AudioArch = self.arch(cfg)
        _, s = latent_shape or self.latent_shape(cfg)
        per_encoder = cfg.data.text_tokens if text_tokens is None else text_tokens
        lc = per_encoder * len(arch.text_encoders)
        d, f = arch.dim, arch.ffn
        inputs = (
            linear(s, arch.input_dim, d)  # patch embedding of [x_t ; context ; mask]
            + linear(s, arch.video_dim, d)  # video-feature projection (at the audio rate)
            + sum(linear(per_encoder, k, d) for k in arch.text_encoders.values())
            + linear(1, 256, d)  # timestep MLP on sinusoidal features
        )
        outside = inputs + linear(1, d, d) + linear(1, d, 6 * d) + linear(s, d, arch.latent_channels)
        block_matmuls = (
            linear(s, d, 4 * d)  # self-attention q, k, v, o
            + linear(s, d, 2 * d)  # cross-attention q and o
            + linear(lc, d, 2 * d)  # cross-attention k, v over the text tokens
            + linear(s, d, f)  # w1
            + linear(s, f, d)  # w2
        )
        block_attention = attention_products(s, s, d) + attention_products(s, lc, d)
        return combine(outside, block_matmuls, block_attention, arch.layers, cfg.train.recompute, inputs)

    def to_tokens(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, T) → (B, T, C): one token per latent frame."""
        return latents.transpose(1, 2)

    def from_tokens(self, tokens: torch.Tensor, latent_shape: tuple[int, ...]) -> torch.Tensor:
        return tokens.transpose(1, 2)

    def draw_training_inputs(
        self, cfg: Config, gen: torch.Generator, latent_shape: tuple[int, ...]
    ) -> dict[str, torch.Tensor]:
        """Per-sample training draws (called by the objective with the sample's keyed generator)."""
        return {CONTEXT_MASK: draw_context_mask(gen, latent_shape[-1], self.arch(cfg).context_tasks)}

    def loss_weights(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """(B, T) per-token loss weights: T / (frames to generate) on those frames, 0 on given frames."""
        known = batch.get(CONTEXT_MASK)
        if known is None:
            return None
        todo = 1.0 - known.float()
        return todo * (todo.shape[1] / todo.sum(dim=1, keepdim=True).clamp(min=1.0))

    def model_inputs(
        self,
        batch: dict[str, torch.Tensor],
        x_t: torch.Tensor,
        t: torch.Tensor,
        drop: dict[str, torch.Tensor] | None,
    ) -> dict[str, Any]:
        b, _, frames = x_t.shape
        known = batch.get(CONTEXT_MASK)
        known = (
            torch.zeros(b, frames, dtype=x_t.dtype, device=x_t.device)
            if known is None
            else known.to(x_t.device, x_t.dtype)
        )
        context = batch["latents"].to(x_t.dtype) * known.unsqueeze(1)
        tokens = torch.cat([x_t, context, known.unsqueeze(1)], dim=1).transpose(1, 2)
        video = resample_frames(batch[VIDEO_FEATURES].to(x_t.dtype), frames)
        text = {k.split(".", 1)[1]: v for k, v in batch.items() if k.startswith("text.")}
        valid = {k.split(".", 1)[1]: v for k, v in batch.items() if k.startswith("text_valid.")}
        return {
            "tokens": tokens,
            "video": video,
            "pos_ids": torch.arange(frames, device=x_t.device).unsqueeze(0),
            "t": t,
            "text": text,
            "text_valid": valid or None,
            "drop": drop,
        }

    def sample(
        self,
        model: nn.Module,
        cfg: Config,
        batch: dict[str, torch.Tensor],
        steps: int = 50,
        cfg_scale: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Long audio: windows of `arch.window` frames overlapping by `arch.overlap`, blended per step with
        triangular weights (megagen/specs/upsampler/multidiffusion.py). A batch `context_mask` (1 = given
        by `latents`) selects extension / infilling; given frames are returned as given."""
        arch: AudioArch = self.arch(cfg)
        frames = batch["latents"].shape[-1]
        full = dict(batch)
        full[VIDEO_FEATURES] = resample_frames(batch[VIDEO_FEATURES], frames)

        def slice_batch(b: dict[str, torch.Tensor], span: tuple[int, int]) -> dict[str, torch.Tensor]:
            lo, hi = span
            out = dict(b)
            out["latents"] = b["latents"][..., lo:hi]
            out[VIDEO_FEATURES] = b[VIDEO_FEATURES][:, lo:hi]
            if CONTEXT_MASK in b:
                out[CONTEXT_MASK] = b[CONTEXT_MASK][:, lo:hi]
            return out

        x = multidiffusion_sample(
            self,
            model,
            cfg,
            full,
            slice_batch,
            dim=2,
            window=arch.window,
            overlap=arch.overlap,
            kind=self.window_weights,
            steps=steps,
            cfg_scale=cfg_scale,
            generator=generator,
        )
        known = batch.get(CONTEXT_MASK)
        if known is not None:
            keep = known.to(x.device).bool().unsqueeze(1)
            x = torch.where(keep, batch["latents"].to(x.dtype), x)
        return x


AUDIO_SPEC = register_spec(AudioSpec())
