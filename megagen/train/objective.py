"""One micro-batch of the flow-matching objective, with every random draw keyed by (seed, step, sample).

Noise, timestep and condition dropout of sample i in step s come from a generator seeded by
(seed, s, i), so a sample is corrupted identically whichever rank or micro-batch processes it.

Two optional spec hooks (a spec without them trains exactly as before):
- `spec.draw_training_inputs(cfg, generator, latent_shape) -> {name: tensor}`: per-sample random inputs
  (e.g. the audio spec's context mask), drawn from a generator keyed by (seed, step, sample, stream 4);
  stacked over the micro-batch and added to the batch the spec's `model_inputs` sees.
- `spec.loss_weights(batch) -> (B, S) float | None`: per-token weights of the squared error (in
  `to_tokens` order, e.g. 0 on given context frames); the trainer's normaliser is unchanged.
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

_NOISE_STREAM, _DROP_STREAM, _SPEC_STREAM = 2, 3, 4


@dataclass
class MicroBatchDraws:
    """The random draws of one micro-batch: noise x0, timesteps t, per-condition drop masks and the spec's
    own per-sample inputs (`spec.draw_training_inputs`)."""

    noise: torch.Tensor
    t: torch.Tensor
    drop: dict[str, torch.Tensor] | None
    extra: dict[str, torch.Tensor] | None = None


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
    extra = None
    draw_extra = getattr(spec, "draw_training_inputs", None)
    if draw_extra is not None and indices:
        per_sample = []
        for i in indices:
            sgen = torch.Generator().manual_seed(sample_seed(cfg.run.seed, step, i, _SPEC_STREAM))
            per_sample.append(draw_extra(cfg, sgen, latent_shape))
        extra = {k: torch.stack([d[k] for d in per_sample]) for k in per_sample[0]} or None
    return MicroBatchDraws(torch.stack(noise), torch.stack(ts), drop, extra)


def weighted_loss_sum(
    pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like `flow_matching_loss_sum`, with each token's mean squared error multiplied by `weights` (B, S)."""
    diff = pred.float() - target.float()
    per_token = diff.square().mean(dim=-1) * weights.float()
    if valid is None:
        return per_token.sum(), torch.tensor(float(per_token.numel()), device=pred.device)
    per_token = torch.where(valid, per_token, torch.zeros((), device=per_token.device))
    return per_token.sum(), valid.sum().float()


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
    if draws.extra:
        batch = {**batch, **{k: v.to(device) for k, v in draws.extra.items()}}
    pred = model(**spec.model_inputs(batch, x_t, t, drop))
    loss_weights = getattr(spec, "loss_weights", None)
    weights = loss_weights(batch) if loss_weights is not None else None
    tokens_per_sample = target.shape[1]
    valid = None
    if shard_targets is not None:
        target, valid = shard_targets(target)
        if weights is not None:
            weights = shard_targets(weights.unsqueeze(-1))[0].squeeze(-1)
    if sample_valid is not None:  # samples the loader skipped (data.on_error=skip) carry no loss
        keep = sample_valid.to(target.device).view(-1, 1).expand(target.shape[0], target.shape[1])
        valid = keep if valid is None else valid & keep

    if weights is not None:
        loss_sum, count = weighted_loss_sum(pred, target, valid, weights.to(pred.device))
    else:
        loss_sum, count = flow_matching_loss_sum(pred.float(), target.float(), valid)
    return loss_sum, count, tokens_per_sample
