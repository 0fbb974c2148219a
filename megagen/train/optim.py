"""AdamW and the learning-rate schedule (linear warmup, then cosine / linear decay or constant)."""

from __future__ import annotations

import math

import torch

from megagen.config import Config


def lr_multiplier(step: int, cfg: Config) -> float:
    """Multiplier of `optim.lr` at optimizer step `step` (0-based)."""
    o = cfg.optim
    if o.warmup_steps and step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    decay_steps = max(1, cfg.train.steps - o.warmup_steps)
    progress = min(1.0, (step - o.warmup_steps) / decay_steps)
    if o.schedule == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return o.min_lr_ratio + (1.0 - o.min_lr_ratio) * shape


def _use_fused(cfg: Config, params: list[torch.nn.Parameter]) -> bool:
    if cfg.optim.fused != "auto":
        return cfg.optim.fused == "true"
    return bool(params) and all(p.device.type == "cuda" for p in params)


def _mixes_dtensors(params: list[torch.nn.Parameter]) -> bool:
    """foreach kernels cannot take DTensors and plain tensors in one list (TP without FSDP)."""
    from torch.distributed.tensor import DTensor

    kinds = {isinstance(p, DTensor) for p in params}
    return len(kinds) > 1


def build_optimizer(
    params: list[torch.nn.Parameter], cfg: Config
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (fused on CUDA) with the configured schedule; no weight decay on 1-D params (norms, biases)."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    opt = torch.optim.AdamW(
        groups,
        lr=cfg.optim.lr,
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        eps=cfg.optim.eps,
        fused=_use_fused(cfg, params) or None,
        foreach=False if _mixes_dtensors(params) else None,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, cfg))
    return opt, sched
