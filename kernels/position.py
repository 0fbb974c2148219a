"""Position encodings: factorized t/h/w learnable tables (Movie Gen) and rotary embedding.

References first; the Triton versions fuse the three gathers and the sum (factorized) and the rotation
(rotary) into one pass each, forward and backward.
"""

from __future__ import annotations

import torch

from megagen.kernels.backend import dispatch, lazy, register


def factorized_position_reference(
    ids: torch.Tensor, table_t: torch.Tensor, table_h: torch.Tensor, table_w: torch.Tensor
) -> torch.Tensor:
    """ids (B|1, S, 3) integer (t, h, w) → table_t[t] + table_h[h] + table_w[w] of shape (B|1, S, D)."""
    return table_t[ids[..., 0]] + table_h[ids[..., 1]] + table_w[ids[..., 2]]


def rotary_frequencies(positions: torch.Tensor, dim: int, base: float = 10000.0):
    """(cos, sin) of shape (S, dim/2) for integer/float positions (S,)."""
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim))
    angles = positions.float()[:, None] * inv[None]
    return torch.cos(angles), torch.sin(angles)


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding of x (B, S, H, D) with cos/sin (S, D/2) (computed in fp32)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    c, s = cos[:, None, :].float(), sin[:, None, :].float()
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


register("factorized_position", "torch", factorized_position_reference)
register("factorized_position", "triton", lazy("triton_ops", "factorized_position"))
register("rotary", "torch", rotary_reference)
register("rotary", "triton", lazy("triton_ops", "rotary"))


def factorized_position(
    ids: torch.Tensor, table_t: torch.Tensor, table_h: torch.Tensor, table_w: torch.Tensor
) -> torch.Tensor:
    """Sum of the three factorized position embeddings, through the configured backend."""
    return dispatch("factorized_position", ids, table_t, table_h, table_w)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding through the configured backend."""
    return dispatch("rotary", x, cos, sin)
