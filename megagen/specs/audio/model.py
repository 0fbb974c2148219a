"""Movie Gen Audio transformer: a DiT over 1-D DAC-VAE latents, per token in and out.

Tokens are latent frames (patch 1, 25 Hz). Each token's input is `[noisy latent ; context latent × mask ;
mask]` (2·C + 1 features: the masked audio context concatenated on channels), embedded by one linear; the
per-frame video features, already resampled to the audio rate by the spec, are projected and added, as is
a learned position embedding. Blocks are DiT blocks — non-affine LayerNorm, adaLN-single modulation of the
self-attention and the two-matrix GELU MLP, and cross-attention to the projected T5 text. The timestep goes
through one shared MLP to 6·d modulation values, to which each block adds its own learned (6, d) table
(the per-layer biases).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from megagen.kernels import RMSNorm, modulate
from megagen.specs.layers import GELUMLP, CrossAttention, SelfAttention, TimestepEmbedder
from megagen.specs.video.model import TextProjector, init_conditioning_and_output, project_text


@dataclass(frozen=True)
class AudioArch:
    """Sizes of one audio preset."""

    layers: int
    dim: int
    ffn: int
    heads: int
    latent_channels: int = 128
    """DAC-VAE latent channels."""
    audio_rate: float = 25.0
    """Latent frames per second."""
    video_rate: float = 24.0
    """Video frames per second of the per-frame video features (used to size synthetic samples)."""
    video_dim: int = 1024
    """Width of one frame's video features."""
    text_encoders: dict[str, int] = field(default_factory=lambda: {"t5": 4096})
    max_frames: int = 768
    """Longest training sequence in latent frames (the position table; about 30 s)."""
    window: int = 250
    """Long-audio sampling window in latent frames (10 s)."""
    overlap: int = 50
    """Latent frames shared by neighbouring sampling windows (blended with triangular weights)."""
    context_tasks: tuple[float, float, float] = (0.5, 0.25, 0.25)
    """Training probabilities of the generation / extension / infilling context masks."""
    norm_eps: float = 1e-6
    qk_norm: bool = False
    """Learned RMSNorm of queries and keys over head_dim (`model.qk_norm`); Movie Gen has none."""

    @property
    def input_dim(self) -> int:
        """Features of one token: noisy latent, masked context latent, mask."""
        return 2 * self.latent_channels + 1


class AudioBlock(nn.Module):
    """DiT block: modulated self-attention, cross-attention to text, modulated GELU MLP.

    `mod_table` is the block's learned bias added to the shared timestep projection (adaLN-single).
    """

    def __init__(self, arch: AudioArch):
        super().__init__()
        d = arch.dim
        self.attn_norm = nn.LayerNorm(d, eps=arch.norm_eps, elementwise_affine=False)
        self.attn = SelfAttention(d, arch.heads, arch.qk_norm, arch.norm_eps)
        self.cross_norm = nn.LayerNorm(d, eps=arch.norm_eps, elementwise_affine=False)
        self.cross_attn = CrossAttention(d, arch.heads, arch.qk_norm, arch.norm_eps)
        self.mlp_norm = nn.LayerNorm(d, eps=arch.norm_eps, elementwise_affine=False)
        self.mlp = GELUMLP(d, arch.ffn)
        self.mod_table = nn.Parameter(torch.zeros(6, d))

    def forward(
        self,
        x: torch.Tensor,
        t_mod: torch.Tensor,
        context: torch.Tensor,
        context_valid: torch.Tensor | None,
        token_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        mod = t_mod.view(t_mod.shape[0], 6, -1) + self.mod_table
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.unbind(1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.attn_norm(x), shift1, scale1), token_valid)
        x = x + self.cross_attn(self.cross_norm(x), context, context_valid)
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(self.mlp_norm(x), shift2, scale2))
        return x


class AudioTransformer(nn.Module):
    """tokens (B, S, 2C+1), video (B, S, Dv), pos_ids (B|1, S), t (B,), text → velocity (B, S, C)."""

    def __init__(self, arch: AudioArch):
        super().__init__()
        self.arch = arch
        d = arch.dim
        self.patch_embed = nn.Linear(arch.input_dim, d, bias=True)
        self.video_proj = nn.Linear(arch.video_dim, d, bias=True)
        self.video_null = nn.Parameter(torch.zeros(d))
        self.pos = nn.Embedding(arch.max_frames, d)
        self.text = nn.ModuleDict(
            {n: TextProjector(k, d, arch.norm_eps) for n, k in arch.text_encoders.items()}
        )
        self.t_embed = TimestepEmbedder(d)
        self.t_mod = nn.Linear(d, 6 * d, bias=True)
        self.blocks = nn.ModuleList(AudioBlock(arch) for _ in range(arch.layers))
        self.out_norm = nn.LayerNorm(d, eps=arch.norm_eps, elementwise_affine=False)
        self.out_table = nn.Parameter(torch.zeros(2, d))
        self.out_proj = nn.Linear(d, arch.latent_channels, bias=True)

    def init_weights(self, std: float = 0.02) -> None:
        """Normal linears and embeddings, zero output so training starts at v̂ = 0."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm) and m.weight is not None:
                nn.init.ones_(m.weight)  # the text projectors' norms (and QK-norms)
        init_conditioning_and_output(self, std)  # draws the same random numbers first, as before
        nn.init.normal_(self.video_null, std=std)

    def forward(
        self,
        tokens: torch.Tensor,
        video: torch.Tensor,
        pos_ids: torch.Tensor,
        t: torch.Tensor,
        text: dict[str, torch.Tensor],
        text_valid: dict[str, torch.Tensor] | None = None,
        drop: dict[str, torch.Tensor] | None = None,
        token_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`token_valid`: (S,) bool mask of real tokens when the engine pads the sequence (see video)."""
        v = self.video_proj(video)
        if drop is not None and "video" in drop:
            v = torch.where(drop["video"].view(-1, 1, 1), self.video_null.to(v.dtype).expand_as(v), v)
        x = self.patch_embed(tokens) + v + self.pos(pos_ids)
        context, context_valid = project_text(self.text, text, text_valid, drop)
        t_emb = self.t_embed(t)
        t_mod = self.t_mod(nn.functional.silu(t_emb))
        for blk in self.blocks:
            x = blk(x, t_mod, context, context_valid, token_valid)
        shift, scale = (t_emb.unsqueeze(1) + self.out_table).unbind(1)
        return self.out_proj(modulate(self.out_norm(x), shift, scale))
