"""Wan 2.1 text-to-video transformer, per-token in and per-token out, equal to diffusers'
`WanTransformer3DModel` on the same weights.

As in `specs/video`, patchify is a reshape done by the spec: the 1×2×2 stride-equals-kernel Conv3d is
`patch_embed`, a linear over patch vectors, so the engine can shard tokens from the first layer on.
Input patch vectors are ordered (C, pt, ph, pw) (the conv weight flattened); output ones (pt, ph, pw, C)
(the order diffusers' unpatchify reads `proj_out`'s features in), so neither layer needs a permutation.

diffusers module (WanTransformer3DModel)         → megagen parameter
  patch_embedding (Conv3d, weight d×C×pt×ph×pw)  → patch_embed (Linear, weight.reshape(d, -1)), bias
  condition_embedder.time_embedder.linear_1 / _2 → time_embed.fc1 / fc2
  condition_embedder.time_proj                   → time_mod
  condition_embedder.text_embedder.linear_1 / _2 → text_embed.fc1 / fc2
  blocks.N.attn1.to_q / to_k / to_v / to_out.0   → blocks.N.attn.q / k / v / o
  blocks.N.attn1.norm_q / norm_k                 → blocks.N.attn.q_norm / k_norm
  blocks.N.attn2.* (same names)                  → blocks.N.cross_attn.* (same mapping)
  blocks.N.norm2 (FP32LayerNorm, affine)         → blocks.N.cross_norm (weight, bias)
  blocks.N.norm1 / norm3 (no parameters)         → (layer_norm_fp32 calls, no parameters)
  blocks.N.ffn.net.0.proj / ffn.net.2            → blocks.N.mlp.w1 / w2
  blocks.N.scale_shift_table (1, 6, d)           → blocks.N.mod_table (6, d)
  scale_shift_table (1, 2, d)                    → out_table (2, d)
  norm_out (no parameters)                       → (layer_norm_fp32 call)
  proj_out                                       → out_proj
  rope (buffers only)                            → (rope_tables from pos_ids, no buffers)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megagen.kernels import RMSNorm, gated_residual, modulate
from megagen.specs.wan.layers import (
    LayerNormFP32,
    TwoLayerEmbedder,
    WanCrossAttention,
    WanMLP,
    WanSelfAttention,
    layer_norm_fp32,
    rope_tables,
    wan_timestep_features,
)


@dataclass(frozen=True)
class WanArch:
    """Sizes of one Wan preset (names follow diffusers' config where they mean the same)."""

    layers: int
    dim: int
    ffn: int
    heads: int
    text_dim: int = 4096
    """Width of the text embeddings (umT5-XXL: 4096)."""
    freq_dim: int = 256
    latent_channels: int = 16
    patch: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    cross_attn_norm: bool = True
    rope_theta: float = 10000.0
    rope_max_seq_len: int = 1024
    """Largest patch coordinate per axis + 1 (diffusers precomputes this many rotary rows)."""
    mask_text_attention: bool = False
    """Wan attends to zero-padded text tokens (its pipeline zeroes them; no mask): False keeps that, so
    pretrained weights see what they were trained on. True masks the padding out of cross-attention."""

    @property
    def patch_dim(self) -> int:
        pt, ph, pw = self.patch
        return self.latent_channels * pt * ph * pw

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def text_encoders(self) -> dict[str, int]:
        """Encoder → embedding width, the form the data tools read (one encoder: umT5)."""
        return {"umt5": self.text_dim}


class WanBlock(nn.Module):
    """Self-attention (modulated, gated), cross-attention (plain residual), GELU MLP (modulated, gated)."""

    def __init__(self, arch: WanArch):
        super().__init__()
        d = arch.dim
        self.eps = arch.eps
        self.attn = WanSelfAttention(d, arch.heads, arch.eps)
        self.cross_norm = LayerNormFP32(d, arch.eps) if arch.cross_attn_norm else nn.Identity()
        self.cross_attn = WanCrossAttention(d, arch.heads, arch.eps)
        self.mlp = WanMLP(d, arch.ffn)
        self.mod_table = nn.Parameter(torch.zeros(6, d))

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        t_mod: torch.Tensor,
        context: torch.Tensor,
        context_valid: torch.Tensor | None,
        token_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        mod = self.mod_table + t_mod.float()
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.unbind(1)
        h = modulate(layer_norm_fp32(x, self.eps), shift1, scale1).to(x.dtype)
        x = gated_residual(x.float(), gate1, self.attn(h, rope, token_valid)).to(x.dtype)
        x = x + self.cross_attn(self.cross_norm(x), context, context_valid)
        h = modulate(layer_norm_fp32(x, self.eps), shift2, scale2).to(x.dtype)
        return gated_residual(x.float(), gate2, self.mlp(h).float()).to(x.dtype)


def masked_text(
    text: torch.Tensor, text_valid: torch.Tensor | None, text_drop: torch.Tensor | None
) -> torch.Tensor:
    """Text embeddings with padding zeroed, as Wan's pipeline pads umT5 outputs; a dropped sample
    (classifier-free guidance) becomes all padding, Wan's stand-in for the empty prompt."""
    keep = None if text_valid is None else text_valid
    if text_drop is not None:
        not_dropped = ~text_drop.view(-1, 1)
        keep = not_dropped if keep is None else keep & not_dropped
    if keep is None:
        return text
    return text * keep.expand(text.shape[:2]).unsqueeze(-1).to(text.dtype)


class WanTransformer(nn.Module):
    """tokens (B, S, patch_dim), pos_ids (1, S, 3), timestep (B,) on [0, 1000], text (B, L, text_dim)
    → Wan's prediction (noise − data) per token, (B, S, patch_dim) in (pt, ph, pw, C) order."""

    def __init__(self, arch: WanArch):
        super().__init__()
        self.arch = arch
        d = arch.dim
        self.patch_embed = nn.Linear(arch.patch_dim, d, bias=True)
        self.time_embed = TwoLayerEmbedder(arch.freq_dim, d, "silu")
        self.time_mod = nn.Linear(d, 6 * d, bias=True)
        self.text_embed = TwoLayerEmbedder(arch.text_dim, d, "gelu_tanh")
        self.blocks = nn.ModuleList(WanBlock(arch) for _ in range(arch.layers))
        self.out_table = nn.Parameter(torch.zeros(2, d))
        self.out_proj = nn.Linear(d, arch.patch_dim, bias=True)

    def init_weights(self, std: float = 0.02) -> None:
        """Normal linears, unit norms, modulation tables ~ N(0, 1/d) as Wan's, zero output (v̂ = 0)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (RMSNorm, nn.LayerNorm)) and m.weight is not None:
                nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for blk in self.blocks:
            nn.init.normal_(blk.mod_table, std=self.arch.dim**-0.5)
        nn.init.normal_(self.out_table, std=self.arch.dim**-0.5)
        nn.init.zeros_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(
        self,
        tokens: torch.Tensor,
        pos_ids: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        text_valid: torch.Tensor | None = None,
        text_drop: torch.Tensor | None = None,
        token_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`token_valid`: (S,) bool mask of real tokens, passed by the engine when it pads the sequence."""
        x = self.patch_embed(tokens)
        rope = rope_tables(pos_ids, self.arch.head_dim, self.arch.rope_theta)
        features = wan_timestep_features(timestep, self.arch.freq_dim).to(self.time_embed.fc1.weight.dtype)
        t_emb = self.time_embed(features).to(text.dtype)
        t_mod = self.time_mod(F.silu(t_emb)).unflatten(1, (6, -1))
        context = self.text_embed(masked_text(text, text_valid, text_drop))
        context_valid = text_valid if self.arch.mask_text_attention else None
        for blk in self.blocks:
            x = blk(x, rope, t_mod, context, context_valid, token_valid)
        shift, scale = (self.out_table + t_emb.unsqueeze(1)).unbind(1)
        h = modulate(layer_norm_fp32(x, self.arch.eps), shift, scale).to(x.dtype)
        return self.out_proj(h)
