"""Attention cores: softmax(QKᵀ/√d)V over (B, S, H, D) tensors with an optional key-validity mask.

A core is its own module so the parallel engine can wrap it (context parallel gathers K/V or swaps
sequence for heads around it) without touching the layer that owns the projections.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Bidirectional attention. q: (B, Sq, H, D); k, v: (B, Skv, H, D); kv_valid: (B, Skv) or (Skv,) bool."""
    mask = None
    if kv_valid is not None:
        mask = (
            kv_valid.view(kv_valid.shape[0], 1, 1, -1) if kv_valid.dim() == 2 else kv_valid.view(1, 1, 1, -1)
        )
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    )
    return out.transpose(1, 2)


class AttentionCore(nn.Module):
    """Parameter-free attention; the seam where context parallelism and kernel backends plug in."""

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        return attention_reference(q, k, v, kv_valid)
