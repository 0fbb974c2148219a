"""One micro-batch of the flow-matching objective, with every random draw keyed by (seed, step, sample).

Noise, timestep and condition dropout of sample i in step s come from a generator seeded by
(seed, s, i), so a sample is corrupted identically whichever rank or micro-batch processes it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from megagen.config import Config
from megagen.data.synthetic import sample_seed
from megagen.diffusion import flow_matching_loss_sum, interpolate, velocity_target
from megagen.specs.base import ModelSpec

_NOISE_STREAM, _DROP_STREAM = 2, 3


@dataclass
class MicroBatchDraws:
    """The random draws of one micro-batch: noise x0, timesteps t and per-condition drop masks."""

    noise: torch.Tensor
    t: torch.Tensor
    drop: dict[str, torch.Tensor] | None


def draw_for_samples(
    cfg: Config, spec: ModelSpec, step: int, indices: list[int], latent_shape: tuple[int, ...]
) -> MicroBatchDraws:
    """Draw noise, logit-normal t and condition dropout for global sample `indices` of `step`."""
    noise, ts, drops = [], [], []
    names = spec.condition_names(cfg)
    for i in indices:
        gen = torch.Generator().manual_seed(sample_seed(cfg.run.seed, step, i, _NOISE_STREAM))
        noise.append(torch.randn(latent_shape, generator=gen))
        ts.append(torch.sigmoid(cfg.train.t_mean + cfg.train.t_std * torch.randn((), generator=gen)))
        dgen = torch.Generator().manual_seed(sample_seed(cfg.run.seed, step, i, _DROP_STREAM))
        drops.append(torch.rand(len(names), generator=dgen) < cfg.train.cond_dropout)
    drop = None
    if cfg.train.cond_dropout > 0 and names:
        stacked = torch.stack(drops)
        drop = {n: stacked[:, j] for j, n in enumerate(names)}
    return MicroBatchDraws(torch.stack(noise), torch.stack(ts), drop)


ShardTargets = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


def flow_matching_micro_step(
    cfg: Config,
    spec: ModelSpec,
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    draws: MicroBatchDraws,
    shard_targets: ShardTargets | None = None,
    sample_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Forward one micro-batch; returns (per-token loss sum on this rank, valid tokens on this rank,
    tokens per sample of the whole unsharded sequence — the loss normaliser's unit).

    `shard_targets` lets the parallel engine cut the per-token target exactly as it cut the model's
    sequence (and mask its padding); in one process the whole target is used.
    """
    x1 = batch["latents"]
    device = x1.device
    x0 = draws.noise.to(device, x1.dtype)
    t = draws.t.to(device)
    x_t = interpolate(x0, x1, t)
    target = spec.to_tokens(velocity_target(x0, x1))
    drop = None if draws.drop is None else {k: v.to(device) for k, v in draws.drop.items()}
    pred = model(**spec.model_inputs(batch, x_t, t, drop))
    tokens_per_sample = target.shape[1]
    valid = None
    if shard_targets is not None:
        target, valid = shard_targets(target)
    if sample_valid is not None:  # samples the loader skipped (data.on_error=skip) carry no loss
        keep = sample_valid.to(target.device).view(-1, 1).expand(target.shape[0], target.shape[1])
        valid = keep if valid is None else valid & keep

    loss_sum, count = flow_matching_loss_sum(pred.float(), target.float(), valid)
    return loss_sum, count, tokens_per_sample
