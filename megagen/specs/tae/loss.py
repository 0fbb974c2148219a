"""The TAE's training loss, per sample: L1 reconstruction + β·KL + w·OPL (+ an optional perceptual term).

- Reconstruction: mean |x̂ − x| over the sample's pixels (a one-frame image compares its one frame).
- KL: mean over latent elements of KL(N(μ, σ²) ‖ N(0, 1)) = ½(μ² + σ² − 1 − log σ²); a mean rather than a
  sum, so β does not have to change with the latent size.
- Outlier penalty (OPL, Movie Gen): on the posterior mean z, per sample and channel with the mean m and
  standard deviation s over (t, h, w), OPL = mean(max(|z − m| − r·s, 0)). It is exactly zero while every
  value lies within r·s of its channel's mean and grows linearly with the distance beyond; it removes the
  high-norm latent "spots" a plain VAE loss learns.
- Perceptual: only when `tae.perceptual_weights` names a TorchScript file (a frozen feature network the
  user supplies; megagen ships none and downloads nothing): mean |f(x̂) − f(x)| on each frame. Without a
  path the term is absent, not zero-weighted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms and the OPL radius r (in standard deviations)."""

    kl: float = 1e-6
    opl: float = 1.0
    opl_radius: float = 3.0
    perceptual: float = 0.0


def reconstruction_l1(recon: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
    """(B,) mean absolute error per sample."""
    return (recon.float() - video.float()).abs().flatten(1).mean(dim=1)


def kl_to_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """(B,) mean over latent elements of KL(N(mean, exp(logvar)) ‖ N(0, 1))."""
    mean, logvar = mean.float(), logvar.float()
    kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)
    return kl.flatten(1).mean(dim=1)


def outlier_penalty(z: torch.Tensor, radius: float) -> torch.Tensor:
    """(B,) OPL: mean of max(|z − m| − radius·s, 0), m and s per sample and channel over (t, h, w)."""
    flat = z.float().flatten(2)  # (B, C, t·h·w)
    centre = flat.mean(dim=2, keepdim=True)
    spread = flat.std(dim=2, keepdim=True, unbiased=False)
    excess = (flat - centre).abs() - radius * spread
    return excess.clamp(min=0.0).flatten(1).mean(dim=1)


def frames_as_images(video: torch.Tensor) -> torch.Tensor:
    """(B, 3, T, H, W) → (B·T, 3, H, W)."""
    b, c, t, h, w = video.shape
    return video.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)


def perceptual_distance(features, recon: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
    """(B,) mean |f(x̂) − f(x)| over every frame's features, f a frozen image network."""
    b = video.shape[0]
    with torch.no_grad():
        target = features(frames_as_images(video.float()))
    pred = features(frames_as_images(recon.float()))
    return (pred - target).abs().reshape(b, -1).mean(dim=1)


def tae_loss_per_sample(
    recon: torch.Tensor,
    video: torch.Tensor,
    mean: torch.Tensor,
    logvar: torch.Tensor,
    weights: LossWeights,
    features=None,
) -> dict[str, torch.Tensor]:
    """Every term per sample, and `total` = L1 + kl·KL + opl·OPL (+ perceptual·P with `features`)."""
    terms = {
        "l1": reconstruction_l1(recon, video),
        "kl": kl_to_standard_normal(mean, logvar),
        "opl": outlier_penalty(mean, weights.opl_radius),
    }
    total = terms["l1"] + weights.kl * terms["kl"] + weights.opl * terms["opl"]
    if features is not None:
        terms["perceptual"] = perceptual_distance(features, recon, video)
        total = total + weights.perceptual * terms["perceptual"]
    terms["total"] = total
    return terms
