"""Flow-matching training objective (Movie Gen, Sec. 3.1).

Convention: ``x0`` is Gaussian noise, ``x1`` is data, and ``t`` runs from 0 (pure noise) to 1 (data).
The path is the optimal-transport interpolation with a tiny ``sigma_min`` so that the noise never fully
vanishes at ``t = 1``; the model regresses the (constant-in-t) velocity of that path.
"""

from __future__ import annotations

import torch
from torch import Tensor

SIGMA_MIN = 1e-5


def sample_timesteps(
    batch_size: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    mean: float = 0.0,
    std: float = 1.0,
) -> Tensor:
    """Draw training timesteps ``t = sigmoid(mean + std * N(0, 1))`` as float32, shape ``(B,)``.

    Logit-normal sampling puts more weight on intermediate t, where the velocity is hardest to predict.
    Draws happen on the CPU (``generator`` must be a CPU generator) and are then moved to ``device``, so a
    seeded run yields identical timesteps on every device type.
    """
    if batch_size < 0:
        raise ValueError(f"batch_size must be >= 0, got {batch_size}")
    z = torch.randn(batch_size, generator=generator, dtype=torch.float32, device="cpu")
    return torch.sigmoid(mean + std * z).to(device)


def _expand_t(t: Tensor, x: Tensor) -> Tensor:
    """Reshape per-sample ``t`` of shape ``(B,)`` to broadcast over ``x``, in ``x``'s dtype."""
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t must have shape ({x.shape[0]},), got {tuple(t.shape)}")
    return t.to(dtype=x.dtype, device=x.device).reshape(-1, *([1] * (x.ndim - 1)))


def interpolate(x0: Tensor, x1: Tensor, t: Tensor, sigma_min: float = SIGMA_MIN) -> Tensor:
    """Point on the noise-to-data path: ``x_t = t * x1 + (1 - (1 - sigma_min) * t) * x0``."""
    if x0.shape != x1.shape:
        raise ValueError(f"x0 and x1 must have the same shape, got {tuple(x0.shape)} and {tuple(x1.shape)}")
    tb = _expand_t(t, x1)
    return tb * x1 + (1 - (1 - sigma_min) * tb) * x0


def velocity_target(x0: Tensor, x1: Tensor, sigma_min: float = SIGMA_MIN) -> Tensor:
    """``d x_t / d t = x1 - (1 - sigma_min) * x0``: the regression target (independent of t)."""
    return x1 - (1 - sigma_min) * x0


def flow_matching_loss_sum(
    pred: Tensor, target: Tensor, token_mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Sum over valid tokens of the per-token MSE (mean over channels), and the valid-token count.

    ``pred``/``target`` are ``(B, S, C)``; ``token_mask`` is a bool ``(B, S)`` (True = valid) or None.
    Sum and count are returned separately so distributed training can divide by the *global* token count.
    Masked tokens are removed with ``torch.where`` before squaring, so NaN/inf padding there yields neither
    NaN loss nor NaN gradients. Accumulation is in at least float32.
    """
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(
            f"pred and target must both be (B, S, C), got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    dtype = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    diff = pred.to(dtype) - target.to(dtype)
    if token_mask is None:
        count = torch.tensor(float(pred.shape[0] * pred.shape[1]), dtype=dtype, device=pred.device)
    else:
        if token_mask.shape != pred.shape[:2] or token_mask.dtype != torch.bool:
            raise ValueError(
                f"token_mask must be bool of shape {tuple(pred.shape[:2])}, "
                f"got {token_mask.dtype} {tuple(token_mask.shape)}"
            )
        diff = torch.where(token_mask.unsqueeze(-1), diff, torch.zeros((), dtype=dtype, device=diff.device))
        count = token_mask.sum().to(dtype)
    loss_sum = diff.square().mean(dim=-1).sum()
    return loss_sum, count


def flow_matching_loss(pred: Tensor, target: Tensor, token_mask: Tensor | None = None) -> Tensor:
    """Mean per-token loss over valid tokens (local count; 0 rather than NaN if no token is valid)."""
    loss_sum, count = flow_matching_loss_sum(pred, target, token_mask)
    return loss_sum / count.clamp(min=1)
