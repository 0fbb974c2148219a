"""A DiT-style video transformer: per-token in, per-token out, no collectives.

What makes it parallelisable by megagen is only how it is written (docs/specs.md, "Rules"):
every projection the plan shards is an `nn.Linear` with a stable name; attention reshapes by `head_dim`
(never by the head count), so a tensor-parallel rank holding a slice of the heads runs the same code; the
attention math lives in its own parameter-free core module (the engine wraps it for context parallelism);
the sequence dimension is dim 1 everywhere.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from megagen.kernels import AttentionCore
from megagen.specs.layers import GELUMLP, TimestepEmbedder


@dataclass(frozen=True)
class Submodules:
    """Which class builds each swappable piece of a block (Megatron's ModuleSpec idea, in miniature).

    A backend is another set of classes with the same constructor arguments and forward signatures:
    the attention core takes (q, k, v, kv_valid) on (B, S, H, D); the norm maps (..., dim) to the same
    shape; the MLP keeps its `w1` (column-parallel) and `w2` (row-parallel) linears so the plan still
    matches.
    """

    attention_core: Callable[[], nn.Module] = AttentionCore
    norm: Callable[[int], nn.Module] = functools.partial(nn.LayerNorm, elementwise_affine=False, eps=1e-6)
    mlp: Callable[[int, int], nn.Module] = GELUMLP


BACKENDS: dict[str, Submodules] = {"torch": Submodules()}
"""Backend name (`DiTArch.backend`) → submodules. Triton / Transformer Engine sets would be added here."""


@dataclass(frozen=True)
class DiTArch:
    """Sizes of one preset."""

    layers: int
    dim: int
    ffn: int
    heads: int
    latent_channels: int = 16
    patch: tuple[int, int, int] = (1, 2, 2)
    max_latent_thw: tuple[int, int, int] = (32, 96, 96)
    text_dim: int = 4096  # T5-XXL width
    backend: str = "torch"

    @property
    def patch_dim(self) -> int:
        pt, ph, pw = self.patch
        return self.latent_channels * pt * ph * pw


class SelfAttention(nn.Module):
    """Bidirectional multi-head self-attention; q/k/v column-parallel, o row-parallel under tp."""

    def __init__(self, dim: int, heads: int, core: Callable[[], nn.Module]):
        super().__init__()
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.core = core()

    def forward(self, x: torch.Tensor, token_valid: torch.Tensor | None = None) -> torch.Tensor:
        b, s, _ = x.shape
        # `-1` heads: the full head count in one process, heads/tp on a tensor-parallel rank.
        q = self.q(x).view(b, s, -1, self.head_dim)
        k = self.k(x).view(b, s, -1, self.head_dim)
        v = self.v(x).view(b, s, -1, self.head_dim)
        # `token_valid`: the mask of real keys when the engine padded the sequence (ParallelPlan.token_mask)
        return self.o(self.core(q, k, v, token_valid).reshape(b, s, -1))


class CrossAttention(nn.Module):
    """Video tokens attend to the (replicated) text context."""

    def __init__(self, dim: int, heads: int, core: Callable[[], nn.Module]):
        super().__init__()
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.core = core()

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, context_valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        b, s, _ = x.shape
        lc = context.shape[1]
        q = self.q(x).view(b, s, -1, self.head_dim)
        k = self.k(context).view(b, lc, -1, self.head_dim)
        v = self.v(context).view(b, lc, -1, self.head_dim)
        return self.o(self.core(q, k, v, context_valid).reshape(b, s, -1))


class DiTBlock(nn.Module):
    """DiT block with cross-attention: per-block adaLN (c → shift/scale/gate ×2), LayerNorm, GELU MLP.

    `ada` is this block's own d→6d modulation (DiT); megagen's `video` spec instead shares one projection
    across blocks (adaLN-single). It stays replicated over tp: it acts on the per-sample vector `c`.
    """

    def __init__(self, arch: DiTArch, sub: Submodules):
        super().__init__()
        d = arch.dim
        self.norm1 = sub.norm(d)
        self.attn = SelfAttention(d, arch.heads, sub.attention_core)
        self.norm2 = sub.norm(d)
        self.cross_attn = CrossAttention(d, arch.heads, sub.attention_core)
        self.norm3 = sub.norm(d)
        self.mlp = sub.mlp(d, arch.ffn)
        self.ada = nn.Linear(d, 6 * d)

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        context: torch.Tensor,
        context_valid: torch.Tensor | None,
        token_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).unsqueeze(1).chunk(6, dim=-1)
        x = x + gate1 * self.attn(self.norm1(x) * (1 + scale1) + shift1, token_valid)
        x = x + self.cross_attn(self.norm2(x), context, context_valid)
        x = x + gate2 * self.mlp(self.norm3(x) * (1 + scale2) + shift2)
        return x


class VideoDiT(nn.Module):
    """(tokens (B, S, patch_dim), pos_ids (B|1, S, 3), t (B,), text (B, L, text_dim)) → (B, S, patch_dim)."""

    def __init__(self, arch: DiTArch):
        super().__init__()
        if arch.backend not in BACKENDS:
            raise ValueError(f"unknown backend {arch.backend!r}; known: {', '.join(BACKENDS)}")
        sub = BACKENDS[arch.backend]
        d = arch.dim
        self.arch = arch
        self.patch_embed = nn.Linear(arch.patch_dim, d)
        mt, mh, mw = arch.max_latent_thw
        pt, ph, pw = arch.patch
        self.pos_t = nn.Embedding(mt // pt, d)
        self.pos_h = nn.Embedding(mh // ph, d)
        self.pos_w = nn.Embedding(mw // pw, d)
        self.text_proj = nn.Sequential(
            nn.Linear(arch.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d)
        )
        self.text_null = nn.Parameter(torch.zeros(d))
        self.t_embed = TimestepEmbedder(d)
        self.blocks = nn.ModuleList(DiTBlock(arch, sub) for _ in range(arch.layers))
        self.out_norm = sub.norm(d)
        self.out_ada = nn.Linear(d, 2 * d)
        self.out_proj = nn.Linear(d, arch.patch_dim)

    def init_weights(self, std: float = 0.02) -> None:
        """Normal weights, zero biases; zero output layers so training starts at v̂ = 0."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.text_null, std=std)
        for layer in (self.out_ada, self.out_proj):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(
        self,
        tokens: torch.Tensor,
        pos_ids: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor,
        text_valid: torch.Tensor | None = None,
        text_drop: torch.Tensor | None = None,
        token_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.patch_embed(tokens)
        x = x + self.pos_t(pos_ids[..., 0]) + self.pos_h(pos_ids[..., 1]) + self.pos_w(pos_ids[..., 2])
        c = nn.functional.silu(self.t_embed(t))
        context = self.text_proj(text)
        if text_drop is not None:  # classifier-free guidance: dropped prompts become the learned null
            null = self.text_null.to(context.dtype).expand_as(context)
            context = torch.where(text_drop.view(-1, 1, 1), null, context)
        for block in self.blocks:
            x = block(x, c, context, text_valid, token_valid)
        shift, scale = self.out_ada(c).unsqueeze(1).chunk(2, dim=-1)
        return self.out_proj(self.out_norm(x) * (1 + scale) + shift)
