"""Wan 2.1's building blocks, numerically as diffusers' `transformer_wan.py` computes them.

Differences from `megagen.specs.layers` that a Wan checkpoint needs: every linear has a bias, LayerNorm
(computed in fp32) instead of RMSNorm around the blocks, RMSNorm on q and k over the whole model width
(all heads together, before the head split), rotary embedding that rotates adjacent channel pairs, and a
timestep taken on Wan's [0, 1000] scale.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megagen.kernels import AttentionCore, Linear, RMSNorm, rotary


def layer_norm_fp32(x: torch.Tensor, eps: float, weight=None, bias=None) -> torch.Tensor:
    """LayerNorm in fp32 (Wan keeps its norms in fp32 whatever the compute dtype); returns fp32."""
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    return F.layer_norm(x.float(), (x.shape[-1],), w, b, eps)


class LayerNormFP32(nn.LayerNorm):
    """Affine LayerNorm computed in fp32 and cast back (Wan's cross-attention norm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm_fp32(x, self.eps, self.weight, self.bias).to(x.dtype)


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Channels of one head given to the (t, h, w) axes: h and w get 2·⌊head_dim/6⌋ each, t the rest."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_tables(pos_ids: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """(2, S, head_dim/2) fp32 cos and sin of the 3-D rotary angles for positions (B|1, S, 3).

    Angles are computed in float64 and rounded once, as diffusers does; every sample shares positions.
    """
    pos = pos_ids[0].to(torch.float64)
    angles = []
    for axis, dim in enumerate(rope_split(head_dim)):
        inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim)
        angles.append(pos[:, axis, None] * inv[None])
    a = torch.cat(angles, dim=-1)
    return torch.stack([a.cos(), a.sin()]).float()


def rotate_pairs(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x (B, S, H, D) that rotates channel pairs (2i, 2i+1) by angle i (Wan's layout).

    `kernels.rotary` rotates halves (i, i + D/2); de-interleaving before and re-interleaving after gives
    the same numbers through the backend's fused kernel.
    """
    halves = x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)
    out = rotary(halves, rope[0], rope[1])
    return out.unflatten(-1, (2, -1)).transpose(-1, -2).flatten(-2)


class WanProjections(nn.Module):
    """q, k, v, o with biases and the across-heads RMSNorm on q and k.

    `q_norm` / `k_norm` normalise the full projection width (all heads); under tensor parallelism that
    width is tp-sharded, and the plan's `sharded_norms` makes the engine all-reduce their sums of squares.
    """

    def __init__(self, dim: int, heads: int, eps: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.q = Linear(dim, dim, bias=True)
        self.k = Linear(dim, dim, bias=True)
        self.v = Linear(dim, dim, bias=True)
        self.o = Linear(dim, dim, bias=True)
        self.q_norm = RMSNorm(dim, eps)
        self.k_norm = RMSNorm(dim, eps)
        self.core = AttentionCore()

    def heads_of(self, y: torch.Tensor) -> torch.Tensor:
        return y.unflatten(-1, (-1, self.head_dim))


class WanSelfAttention(WanProjections):
    """Self-attention over the video tokens with 3-D rotary positions."""

    def forward(
        self, x: torch.Tensor, rope: torch.Tensor, token_valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`rope`: (2, S, head_dim/2) from `rope_tables`; `token_valid`: (S,) mask of real keys."""
        q = rotate_pairs(self.heads_of(self.q_norm(self.q(x))), rope)
        k = rotate_pairs(self.heads_of(self.k_norm(self.k(x))), rope)
        v = self.heads_of(self.v(x))
        return self.o(self.core(q, k, v, token_valid).flatten(2))


class WanCrossAttention(WanProjections):
    """Video tokens attend to the embedded text (no rotary)."""

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, context_valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        q = self.heads_of(self.q_norm(self.q(x)))
        k = self.heads_of(self.k_norm(self.k(context)))
        v = self.heads_of(self.v(context))
        return self.o(self.core(q, k, v, context_valid).flatten(2))


class WanMLP(nn.Module):
    """w2(gelu_tanh(w1 x)), both with biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = Linear(dim, hidden, bias=True)
        self.w2 = Linear(hidden, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))


def wan_timestep_features(timestep: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(cos, sin) sinusoids of a timestep on Wan's [0, 1000] scale (diffusers `Timesteps`, cos first)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half
    )
    args = timestep.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TwoLayerEmbedder(nn.Module):
    """fc2(act(fc1 x)): Wan's timestep MLP (SiLU) and its text projection (GELU-tanh)."""

    def __init__(self, in_dim: int, dim: int, activation: str):
        super().__init__()
        self.activation = activation
        self.fc1 = nn.Linear(in_dim, dim, bias=True)
        self.fc2 = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = F.silu(h) if self.activation == "silu" else F.gelu(h, approximate="tanh")
        return self.fc2(h)
