"""Transformer building blocks shared by the specs.

Every projection is a bias-free `nn.Linear` named so a `ParallelPlan` can point at it, and attention
reshapes by `head_dim` (not head count) so the same code runs on a tensor-parallel shard of the heads.
Fused ops go through `megagen.kernels` (backend registry: `kernels.backend`, `kernels.attention`); block
projections are `kernels.Linear` (an nn.Linear whose GEMM runs in FP8 through Transformer Engine when
`train.fp8=true`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from megagen.kernels import AttentionCore, Linear, RMSNorm, swiglu


def qk_norm_layer(head_dim: int, enabled: bool, eps: float) -> nn.Module:
    """A learned RMSNorm over head_dim, one weight shared by every head (identity when disabled).

    Applied to queries and keys it keeps attention logits bounded. Under tensor parallelism it runs on
    head shards inside the region, so its gradient is partial over tp (the engine's gradient rule sums it).
    """
    return RMSNorm(head_dim, eps) if enabled else nn.Identity()


class SelfAttention(nn.Module):
    """Full bidirectional multi-head self-attention over the token sequence (optionally QK-normed)."""

    def __init__(self, dim: int, heads: int, qk_norm: bool = False, eps: float = 1e-6):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.q = Linear(dim, dim, bias=False)
        self.k = Linear(dim, dim, bias=False)
        self.v = Linear(dim, dim, bias=False)
        self.o = Linear(dim, dim, bias=False)
        self.q_norm = qk_norm_layer(self.head_dim, qk_norm, eps)
        self.k_norm = qk_norm_layer(self.head_dim, qk_norm, eps)
        self.core = AttentionCore()

    def forward(self, x: torch.Tensor, token_valid: torch.Tensor | None = None) -> torch.Tensor:
        """`token_valid`: (S,) bool mask of real keys, given when the engine padded the sequence."""
        b, s, _ = x.shape
        q = self.q(x).view(b, s, -1, self.head_dim)
        k = self.k(x).view(b, s, -1, self.head_dim)
        v = self.v(x).view(b, s, -1, self.head_dim)
        return self.o(self.core(self.q_norm(q), self.k_norm(k), v, token_valid).reshape(b, s, -1))


class CrossAttention(nn.Module):
    """Video tokens (queries) attend to the concatenated text context (keys/values; optionally QK-normed)."""

    def __init__(self, dim: int, heads: int, qk_norm: bool = False, eps: float = 1e-6):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q = Linear(dim, dim, bias=False)
        self.k = Linear(dim, dim, bias=False)
        self.v = Linear(dim, dim, bias=False)
        self.o = Linear(dim, dim, bias=False)
        self.q_norm = qk_norm_layer(self.head_dim, qk_norm, eps)
        self.k_norm = qk_norm_layer(self.head_dim, qk_norm, eps)
        self.core = AttentionCore()

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, context_valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        b, s, _ = x.shape
        lc = context.shape[1]
        q = self.q(x).view(b, s, -1, self.head_dim)
        k = self.k(context).view(b, lc, -1, self.head_dim)
        v = self.v(context).view(b, lc, -1, self.head_dim)
        return self.o(self.core(self.q_norm(q), self.k_norm(k), v, context_valid).reshape(b, s, -1))


class SwiGLUMLP(nn.Module):
    """Llama-3 feed-forward: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = Linear(dim, hidden, bias=False)
        self.w3 = Linear(dim, hidden, bias=False)
        self.w2 = Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(swiglu(self.w1(x), self.w3(x)))


class GELUMLP(nn.Module):
    """DiT feed-forward with two matrices: w2(gelu(w1 x))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = Linear(dim, hidden, bias=False)
        self.w2 = Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(nn.functional.gelu(self.w1(x), approximate="tanh"))


def timestep_frequencies(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of t ∈ [0, 1] (scaled by 1000 so the frequencies resolve small steps)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """t → sinusoidal features → MLP → (B, dim): the one shared timestep network of adaLN-single."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.fc1 = nn.Linear(freq_dim, dim, bias=True)
        self.fc2 = nn.Linear(dim, dim, bias=True)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        h = timestep_frequencies(t, self.freq_dim).to(self.fc1.weight.dtype)
        return self.fc2(nn.functional.silu(self.fc1(h)))
