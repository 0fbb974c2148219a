"""Movie Gen Video transformer: per-token in, per-token out.

Patchify (1×2×2 over 16-channel TAE latents) is a reshape done by the spec, so the network sees patch
vectors and `patch_embed` is the stride-equals-kernel conv written as a linear. Working per token lets the
engine shard the sequence from the first layer to the loss without gathering it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from megagen.kernels import RMSNorm, factorized_position, gated_residual
from megagen.specs.layers import CrossAttention, SelfAttention, SwiGLUMLP, TimestepEmbedder


@dataclass(frozen=True)
class VideoArch:
    """Sizes of one video preset."""

    layers: int
    dim: int
    ffn: int
    heads: int
    latent_channels: int = 16
    patch: tuple[int, int, int] = (1, 2, 2)
    max_latent_thw: tuple[int, int, int] = (32, 96, 96)
    text_encoders: dict[str, int] = field(
        default_factory=lambda: {"ul2": 4096, "byt5": 1472, "metaclip": 1280}
    )
    norm_eps: float = 1e-6
    qk_norm: bool = False
    """Learned RMSNorm of queries and keys over head_dim (`model.qk_norm`); Movie Gen has none."""

    @property
    def patch_dim(self) -> int:
        pt, ph, pw = self.patch
        return self.latent_channels * pt * ph * pw


class VideoBlock(nn.Module):
    """Llama-3 block with cross-attention and adaLN-single modulation.

    `mod_table` is the small per-block learnable table added to the shared timestep projection
    (adaLN-single); per-block d→6d adaLN would add ≈11 B parameters at 30B.
    """

    def __init__(self, arch: VideoArch):
        super().__init__()
        d = arch.dim
        self.attn_norm = RMSNorm(d, arch.norm_eps)
        self.attn = SelfAttention(d, arch.heads, arch.qk_norm, arch.norm_eps)
        self.cross_norm = RMSNorm(d, arch.norm_eps)
        self.cross_attn = CrossAttention(d, arch.heads, arch.qk_norm, arch.norm_eps)
        self.mlp_norm = RMSNorm(d, arch.norm_eps)
        self.mlp = SwiGLUMLP(d, arch.ffn)
        self.mod_table = nn.Parameter(torch.zeros(6, d))

    def forward(
        self,
        x: torch.Tensor,
        pos: torch.Tensor,
        t_mod: torch.Tensor,
        context: torch.Tensor,
        context_valid: torch.Tensor | None,
        token_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        mod = t_mod.view(t_mod.shape[0], 6, -1) + self.mod_table
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.unbind(1)
        x = x + pos
        x = gated_residual(x, gate1, self.attn(self.attn_norm.modulated(x, shift1, scale1), token_valid))
        x = x + self.cross_attn(self.cross_norm(x), context, context_valid)
        x = gated_residual(x, gate2, self.mlp(self.mlp_norm.modulated(x, shift2, scale2)))
        return x


class TextProjector(nn.Module):
    """One text encoder's linear + norm into the model width, with a learned null for CFG dropout."""

    def __init__(self, in_dim: int, dim: int, eps: float):
        super().__init__()
        self.proj = nn.Linear(in_dim, dim, bias=False)
        self.norm = RMSNorm(dim, eps)
        self.null = nn.Parameter(torch.zeros(dim))

    def forward(self, emb: torch.Tensor, drop: torch.Tensor | None) -> torch.Tensor:
        h = self.norm(self.proj(emb))
        if drop is None:
            return h
        return torch.where(drop.view(-1, 1, 1), self.null.to(h.dtype).expand_as(h), h)


def project_text(
    projectors: nn.ModuleDict,
    text: dict[str, torch.Tensor],
    text_valid: dict[str, torch.Tensor] | None,
    drop: dict[str, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every text encoder's embedding through its projector (null embedding where `drop[name]`), joined on
    the token dim: the cross-attention context and its key mask (None when no `text_valid` is given)."""
    context = torch.cat(
        [proj(text[n], None if drop is None else drop.get(n)) for n, proj in projectors.items()], dim=1
    )
    if text_valid is None:
        return context, None
    return context, torch.cat([text_valid[n] for n in projectors], dim=1)


def init_conditioning_and_output(model: nn.Module, std: float) -> None:
    """What the video and audio transformers initialise alike: each block's adaLN table (std dim^-1/2),
    the text projectors' null embeddings (std), and a zero output layer, so training starts at v̂ = 0."""
    for blk in model.blocks:
        nn.init.normal_(blk.mod_table, std=model.arch.dim**-0.5)
    for proj in model.text.values():
        nn.init.normal_(proj.null, std=std)
    nn.init.zeros_(model.out_table)
    nn.init.zeros_(model.out_proj.weight)
    nn.init.zeros_(model.out_proj.bias)


class VideoTransformer(nn.Module):
    """tokens (B, S, patch_dim), pos_ids (B|1, S, 3), t (B,), text embeddings → velocity (B, S, patch_dim)."""

    def __init__(self, arch: VideoArch):
        super().__init__()
        self.arch = arch
        d = arch.dim
        self.patch_embed = nn.Linear(arch.patch_dim, d, bias=True)
        mt, mh, mw = arch.max_latent_thw
        pt, ph, pw = arch.patch
        self.pos_t = nn.Embedding(mt // pt, d)
        self.pos_h = nn.Embedding(mh // ph, d)
        self.pos_w = nn.Embedding(mw // pw, d)
        self.text = nn.ModuleDict(
            {n: TextProjector(k, d, arch.norm_eps) for n, k in arch.text_encoders.items()}
        )
        self.t_embed = TimestepEmbedder(d)
        self.t_mod = nn.Linear(d, 6 * d, bias=True)
        self.blocks = nn.ModuleList(VideoBlock(arch) for _ in range(arch.layers))
        self.out_norm = RMSNorm(d, arch.norm_eps, affine=False)
        self.out_table = nn.Parameter(torch.zeros(2, d))
        self.out_proj = nn.Linear(d, arch.patch_dim, bias=True)

    def init_weights(self, std: float = 0.02) -> None:
        """Normal linears, small position embeddings, zero output so training starts at v̂ = 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, RMSNorm) and m.weight is not None:
                nn.init.ones_(m.weight)
        init_conditioning_and_output(self, std)

    def forward(
        self,
        tokens: torch.Tensor,
        pos_ids: torch.Tensor,
        t: torch.Tensor,
        text: dict[str, torch.Tensor],
        text_valid: dict[str, torch.Tensor] | None = None,
        text_drop: dict[str, torch.Tensor] | None = None,
        token_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`token_valid`: (S,) bool mask of real tokens, which the engine passes when it pads the sequence
        for context/sequence parallelism (`ParallelPlan.token_mask`); self-attention masks the rest."""
        x = self.patch_embed(tokens)
        pos = factorized_position(pos_ids, self.pos_t.weight, self.pos_h.weight, self.pos_w.weight)
        context, context_valid = project_text(self.text, text, text_valid, text_drop)
        t_emb = self.t_embed(t)
        t_mod = self.t_mod(nn.functional.silu(t_emb))
        for blk in self.blocks:
            x = blk(x, pos, t_mod, context, context_valid, token_valid)
        shift, scale = (t_emb.unsqueeze(1) + self.out_table).unbind(1)
        return self.out_proj(self.out_norm.modulated(x, shift, scale))
