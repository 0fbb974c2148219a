"""Attention cores: softmax(QKᵀ/√d)V over (B, S, H, D) tensors with an optional key-validity mask.

A core is its own module so the parallel engine can wrap it (context parallel gathers K/V or swaps
sequence for heads around it) without touching the layer that owns the projections.

`kernels.attention` picks the implementation: `auto` lets torch's SDPA choose (flash / cuDNN /
memory-efficient / math); `flash`, `cudnn`, `efficient`, `math` pin one SDPA backend on CUDA (flash takes no
mask, so a padded call falls back to cuDNN / efficient); `te` uses Transformer Engine's
DotProductAttention when it is installed and the inputs are fp16/bf16 on CUDA, else SDPA. On CPU every
choice runs SDPA with torch's own CPU selection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megagen.kernels import backend as registry


def _sdpa_mask(kv_valid: torch.Tensor | None) -> torch.Tensor | None:
    if kv_valid is None:
        return None
    if kv_valid.dim() == 2:
        return kv_valid.view(kv_valid.shape[0], 1, 1, -1)
    return kv_valid.view(1, 1, 1, -1)


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Bidirectional attention. q: (B, Sq, H, D); k, v: (B, Skv, H, D); kv_valid: (B, Skv) or (Skv,) bool."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=_sdpa_mask(kv_valid)
    )
    return out.transpose(1, 2)


def attention_math(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_valid: torch.Tensor | None = None
) -> torch.Tensor:
    """The explicit formula in fp32 (what every SDPA backend is checked against)."""
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))
    scores = qf @ kf.transpose(-1, -2) / q.shape[-1] ** 0.5
    mask = _sdpa_mask(kv_valid)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ vf).transpose(1, 2).to(q.dtype)


def _sdpa_backends(kind: str, masked: bool) -> list | None:
    from torch.nn.attention import SDPBackend

    table = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }
    if kind not in table:
        return None
    if kind == "flash" and masked:  # flash has no mask input: the padded call goes to the next best
        return [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    return [table[kind]]


def attention_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_valid: torch.Tensor | None = None,
    kind: str = "auto",
) -> torch.Tensor:
    """SDPA with an optional pinned backend (CUDA only; CPU keeps torch's own choice)."""
    backends = _sdpa_backends(kind, kv_valid is not None) if q.device.type == "cuda" else None
    if backends is None:
        return attention_reference(q, k, v, kv_valid)
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(backends):
        return attention_reference(q, k, v, kv_valid)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention through the configured `kernels.attention` choice."""
    kind = registry.settings().attention
    name = "sdpa"
    if (
        kind == "te"
        and q.device.type == "cuda"
        and q.dtype in (torch.float16, torch.bfloat16)
        and registry.installed("te")
    ):
        from megagen.kernels.te_ops import attention as te_attention

        out, name = te_attention(q, k, v, kv_valid), "te"
    else:
        out = attention_sdpa(q, k, v, kv_valid, kind)
    if not torch.compiler.is_compiling():
        registry._usage[("attention", name)] = registry._usage.get(("attention", name), 0) + 1
    return out


class AttentionCore(nn.Module):
    """Parameter-free attention; the seam where context parallelism and kernel backends plug in."""

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        return attention(q, k, v, kv_valid)
