"""The one tensor comparison the tests use: ‖a−b‖/‖b‖ in float64 (‖a−b‖ itself when b is all zeros)."""

from __future__ import annotations

import torch


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    denom = torch.linalg.vector_norm(b)
    diff = torch.linalg.vector_norm(a - b)
    return float(diff / denom) if denom > 0 else float(diff)
