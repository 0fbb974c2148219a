"""MultiDiffusion along one axis: overlapping windows predicted separately, blended at every sampler step.

A latent too long for the model is cut along one dim (latent frames) into windows of `window` frames that
overlap by `overlap` frames: starts 0, s, 2s, … with stride s = window − overlap, and the last window is
aligned to the end so that every frame is covered (it may overlap its neighbour by more than `overlap`).
At every step of the sampler the model predicts a velocity on each window on its own (positions restart at
0 in each window: the model sees short clips, as in training), and the velocity of frame i is the weighted
average over the windows [a_k, b_k) that contain it:

    v(i) = Σ_k w(i − a_k) · v_k(i − a_k) / Σ_k w(i − a_k)

with one weight profile w(j), j = 0 … L−1, over a window of L frames:

- ``uniform``:    w(j) = 1 — the plain average of overlapping predictions (MultiDiffusion; the upsampler);
- ``triangular``: w(j) = min(1, (j + 1)/(o + 1), (L − j)/(o + 1)) with o = overlap — weights ramp linearly
  across each overlap, so two windows overlapping by exactly o frames cross-fade with weights summing to 1
  (the audio spec's long-audio sampler).

Frames covered by one window only get that window's prediction unchanged (normalised weight 1). A sequence
of at most `window` frames is a single window whose normalised weights are exactly 1.0, so the result equals
the plain (unwindowed) sampler bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

WEIGHT_KINDS = ("uniform", "triangular")


def window_spans(n: int, window: int, overlap: int) -> list[tuple[int, int]]:
    """[(start, end)] of the windows covering n frames (one window when n <= window)."""
    if window < 1 or not 0 <= overlap < window:
        raise ValueError(
            f"need window >= 1 and 0 <= overlap < window, got window={window}, overlap={overlap}"
        )
    if n <= window:
        return [(0, n)]
    stride = window - overlap
    starts = list(range(0, n - window, stride)) + [n - window]
    return [(a, a + window) for a in starts]


def window_profile(length: int, overlap: int, kind: str) -> torch.Tensor:
    """The unnormalised weight w(j) of each of a window's `length` frames (float64)."""
    if kind not in WEIGHT_KINDS:
        raise ValueError(f"unknown window weighting {kind!r}; choose one of {', '.join(WEIGHT_KINDS)}")
    j = torch.arange(length, dtype=torch.float64)
    if kind == "uniform":
        return torch.ones(length, dtype=torch.float64)
    ramp = torch.minimum((j + 1) / (overlap + 1), (length - j) / (overlap + 1))
    return ramp.clamp(max=1.0)


def blend_weights(n: int, spans: list[tuple[int, int]], overlap: int, kind: str) -> list[torch.Tensor]:
    """Per window, the normalised weight of each of its frames: w(i − a_k) / Σ_k' w(i − a_k') (float64)."""
    total = torch.zeros(n, dtype=torch.float64)
    profiles = []
    for a, b in spans:
        w = window_profile(b - a, overlap, kind)
        total[a:b] += w
        profiles.append(w)
    return [w / total[a:b] for (a, b), w in zip(spans, profiles)]


WindowVelocity = Callable[[torch.Tensor, torch.Tensor, Any, tuple[int, int]], torch.Tensor]


def windowed_velocity(
    window_velocity: WindowVelocity, spans: list[tuple[int, int]], weights: list[torch.Tensor], dim: int
) -> Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]:
    """A velocity function over the whole latent that blends `window_velocity(x_window, t, cond, span)`."""

    def velocity(x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        out = torch.zeros_like(x)
        for (a, b), w in zip(spans, weights):
            v = window_velocity(x.narrow(dim, a, b - a), t, cond, (a, b))
            shape = [1] * x.dim()
            shape[dim] = b - a
            out.narrow(dim, a, b - a).add_(v.to(x.dtype) * w.to(x.device, x.dtype).view(shape))
        return out

    return velocity


def multidiffusion_sample(
    spec,
    model: torch.nn.Module,
    cfg,
    batch: dict[str, torch.Tensor],
    slice_batch: Callable[[dict[str, torch.Tensor], tuple[int, int]], dict[str, torch.Tensor]],
    *,
    dim: int,
    window: int,
    overlap: int,
    kind: str,
    steps: int = 50,
    cfg_scale: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """`ModelSpec.sample` (Euler, linear-quadratic schedule, CFG) with the velocity blended over windows.

    `slice_batch(batch, (a, b))` returns the conditioning of frames [a, b) (text is usually whole). Noise,
    schedule and guidance are exactly those of the default sampler, so one window reproduces it.
    """
    from megagen.diffusion import euler_sample

    noise, keep, drop, schedule = spec.sampling_start(cfg, batch, steps, generator)
    shape = tuple(noise.shape)
    spans = window_spans(shape[dim], window, overlap)
    weights = blend_weights(shape[dim], spans, overlap, kind)

    def window_velocity(x, t, cond, span):
        sub = slice_batch(batch, span)
        out = model(**spec.model_inputs(sub, x, t.to(x.dtype), cond))
        return spec.from_tokens(out, tuple(x.shape[1:]))

    velocity = windowed_velocity(window_velocity, spans, weights, dim)
    return euler_sample(velocity, noise, schedule, keep, drop, cfg_scale)
