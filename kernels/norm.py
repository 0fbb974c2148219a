"""RMSNorm and RMSNorm fused with adaLN modulation: references, and dispatch through the backend registry."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megagen.kernels.backend import dispatch, lazy, register
from megagen.kernels.modulation import modulate_reference


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Normalise over the last dim in fp32 and cast back: the numerics every backend must match."""
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


def rms_norm_modulate_reference(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, shift: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """modulate(rms_norm(x)) with per-sample (B, D) shift/scale over tokens (B, S, D)."""
    return modulate_reference(rms_norm_reference(x, weight, eps), shift, scale)


@register("rms_norm", "torch")
def _rms_norm_torch(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    # torch's own fused op computes the same thing as the reference (and is what inductor fuses)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


@register("rms_norm_modulate", "torch")
def _rms_norm_modulate_torch(x, weight, eps, shift, scale):
    return modulate_reference(_rms_norm_torch(x, weight, eps), shift, scale)


register("rms_norm", "triton", lazy("triton_ops", "rms_norm"))
register("rms_norm_modulate", "triton", lazy("triton_ops", "rms_norm_modulate"))


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm through the configured backend."""
    return dispatch("rms_norm", x, weight, eps)


def rms_norm_modulate(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, shift: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """RMSNorm then adaLN modulation in one pass (x (B, S, D); shift, scale (B, D))."""
    return dispatch("rms_norm_modulate", x, weight, eps, shift, scale)


class RMSNorm(nn.Module):
    """RMSNorm with an optional learnable scale (no bias, Llama-3 style)."""

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def modulated(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """`modulate(self(x), shift, scale)` fused where the backend has it."""
        return rms_norm_modulate(x, self.weight, self.eps, shift, scale)
