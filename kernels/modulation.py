"""adaLN modulation: the plain-PyTorch reference."""

import torch


def modulate_reference(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift with per-sample (B, D) shift/scale broadcast over tokens (B, S, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


modulate = modulate_reference
