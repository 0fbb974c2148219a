"""adaLN modulation and the gated residual: references, and dispatch through the backend registry."""

from __future__ import annotations

import torch

from megagen.kernels.backend import dispatch, lazy, register


def modulate_reference(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift with per-sample (B, D) shift/scale broadcast over tokens (B, S, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def gated_residual_reference(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + gate * y with a per-sample (B, D) gate broadcast over tokens (B, S, D)."""
    return x + gate.unsqueeze(1) * y


register("modulate", "torch", modulate_reference)
register("gated_residual", "torch", gated_residual_reference)
register("gated_residual", "triton", lazy("triton_ops", "gated_residual"))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation through the configured backend (alone it is one elementwise op: torch everywhere;
    the fused form is `rms_norm_modulate`)."""
    return dispatch("modulate", x, shift, scale)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + gate * y through the configured backend."""
    return dispatch("gated_residual", x, gate, y)
