"""Movie Gen's temporal autoencoder (TAE): 8x compression in time, height and width to 16 channels.

Every convolution is "2.5D": a 2-D spatial 3x3 convolution on each frame, then a 1-D temporal convolution
of width 3 on each pixel, so the image-autoencoder part and the temporal part stay separable. The middle
of each side runs spatial self-attention (within a frame) and then temporal self-attention (along each
pixel's time line). The decoder mirrors the encoder. The encoder ends in the KL bottleneck's mean and
log-variance. Normalisation is per frame (`FrameGroupNorm`).

Frames: each temporal downsampling is a stride-2 convolution padded by one frame on both sides, so T
frames become ceil(T / 2) (a one-frame image stays one frame: images are one-frame videos). The decoder
doubles the frames at each level and `decode(z, frames=T)` crops the result to the T frames that were
encoded (default: 8 x latent frames).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TAEArch:
    """Channel widths per resolution level (3 levels below the first = 8x), blocks per level, groups."""

    channels: tuple[int, ...] = (32, 64, 128, 128)
    blocks_per_level: int = 1
    latent_channels: int = 16
    groups: int = 8
    heads: int = 1

    @property
    def dim(self) -> int:
        """The widest feature width: the GEMM width the throughput meter measures the device peak at."""
        return max(self.channels)

    @property
    def text_encoders(self) -> dict[str, int]:
        """A TAE reads no text (synthetic data and `megagen data synth` ask every spec)."""
        return {}

    @property
    def compression(self) -> tuple[int, int, int]:
        factor = 2 ** (len(self.channels) - 1)
        return (factor, factor, factor)


class Conv25d(nn.Module):
    """A 3x3 spatial convolution per frame, then a width-3 temporal convolution per pixel."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.spatial = nn.Conv3d(cin, cout, (1, 3, 3), stride=(1, stride, stride), padding=(0, 1, 1))
        self.temporal = nn.Conv3d(cout, cout, (3, 1, 1), stride=(stride, 1, 1), padding=(1, 0, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.temporal(self.spatial(x))


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm with statistics per frame: nothing but the temporal convolutions and attention mixes
    frames, so a tile's result does not depend on the clip around it and an image is a one-frame video."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        return super().forward(frames).reshape(b, t, c, h, w).transpose(1, 2)


class ResBlock(nn.Module):
    """Pre-norm residual block of two 2.5D convolutions (1x1x1 skip projection when widths differ)."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = FrameGroupNorm(groups, cin)
        self.conv1 = Conv25d(cin, cout)
        self.norm2 = FrameGroupNorm(groups, cout)
        self.conv2 = Conv25d(cout, cout)
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AxisAttention(nn.Module):
    """Self-attention along one axis group: `spatial` attends within a frame, `temporal` along time."""

    def __init__(self, dim: int, groups: int, heads: int, axis: str):
        super().__init__()
        self.axis = axis
        self.heads = heads
        self.norm = FrameGroupNorm(groups, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = self.norm(x)
        if self.axis == "spatial":  # sequences of h*w tokens, one per frame
            seq = y.permute(0, 2, 3, 4, 1).reshape(b * t, h * w, c)
        else:  # sequences of t tokens, one per pixel
            seq = y.permute(0, 3, 4, 2, 1).reshape(b * h * w, t, c)
        n, s, _ = seq.shape
        q, k, v = self.qkv(seq).reshape(n, s, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, s, c)
        o = self.out(o)
        if self.axis == "spatial":
            o = o.reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3)
        else:
            o = o.reshape(b, h, w, t, c).permute(0, 4, 3, 1, 2)
        return x + o


class MiddleBlock(nn.Module):
    """ResBlock, spatial attention, temporal attention, ResBlock (at the lowest resolution)."""

    def __init__(self, dim: int, groups: int, heads: int):
        super().__init__()
        self.res1 = ResBlock(dim, dim, groups)
        self.spatial_attn = AxisAttention(dim, groups, heads, "spatial")
        self.temporal_attn = AxisAttention(dim, groups, heads, "temporal")
        self.res2 = ResBlock(dim, dim, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res2(self.temporal_attn(self.spatial_attn(self.res1(x))))


class DownLevel(nn.Module):
    """ResBlocks at one resolution, then (unless last) a stride-2 2.5D convolution in t, h and w."""

    def __init__(self, cin: int, cout: int, arch: TAEArch, downsample: bool):
        super().__init__()
        widths = [cin] + [cout] * arch.blocks_per_level
        self.res = nn.ModuleList(ResBlock(a, b, arch.groups) for a, b in zip(widths, widths[1:]))
        self.down = Conv25d(cout, cout, stride=2) if downsample else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.res:
            x = block(x)
        return self.down(x)


class UpLevel(nn.Module):
    """(Unless first) nearest 2x upsampling in t, h and w plus a 2.5D convolution, then ResBlocks."""

    def __init__(self, cin: int, cout: int, arch: TAEArch, upsample: bool):
        super().__init__()
        self.upsample = upsample
        self.up = Conv25d(cin, cin) if upsample else nn.Identity()
        widths = [cin] + [cout] * arch.blocks_per_level
        self.res = nn.ModuleList(ResBlock(a, b, arch.groups) for a, b in zip(widths, widths[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.upsample:
            x = self.up(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        for block in self.res:
            x = block(x)
        return x


class OutputHead(nn.Module):
    """GroupNorm, SiLU, 2.5D convolution to the output channels."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm = FrameGroupNorm(groups, cin)
        self.conv = Conv25d(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.silu(self.norm(x)))


class TAE(nn.Module):
    """video (B, 3, T, H, W) in [-1, 1] ⇄ latents (B, 16, ceil(T/8), H/8, W/8).

    `blocks` lists the encoder's and decoder's stages in execution order: they are the FSDP units.
    """

    def __init__(self, arch: TAEArch):
        super().__init__()
        self.arch = arch
        ch, g = arch.channels, arch.groups
        levels = len(ch)
        enc: list[nn.Module] = [Conv25d(3, ch[0])]
        enc += [DownLevel(ch[max(i - 1, 0)], ch[i], arch, i < levels - 1) for i in range(levels)]
        enc += [MiddleBlock(ch[-1], g, arch.heads), OutputHead(ch[-1], 2 * arch.latent_channels, g)]
        dec: list[nn.Module] = [Conv25d(arch.latent_channels, ch[-1]), MiddleBlock(ch[-1], g, arch.heads)]
        rev = ch[::-1]
        dec += [UpLevel(rev[max(i - 1, 0)], rev[i], arch, i > 0) for i in range(levels)]
        dec += [OutputHead(ch[0], 3, g)]
        self.encoder_stages = len(enc)
        self.blocks = nn.ModuleList(enc + dec)

    def init_weights(self, std: float = 0.02) -> None:
        """PyTorch's default (fan-in) init for every layer: `std` is a transformer knob the TAE ignores."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def encode_moments(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior's (mean, logvar), each (B, 16, ceil(T/8), H/8, W/8)."""
        self._check_video(video)
        x = video
        for stage in self.blocks[: self.encoder_stages]:
            x = stage(x)
        mean, logvar = x.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, latents: torch.Tensor, frames: int | None = None) -> torch.Tensor:
        """Latents → video (B, 3, frames, 8h, 8w); `frames` defaults to 8 x latent frames."""
        x = latents
        for stage in self.blocks[self.encoder_stages :]:
            x = stage(x)
        return x if frames is None else x[:, :, :frames]

    def forward(self, video: torch.Tensor, eps: torch.Tensor | None = None):
        """(reconstruction, mean, logvar); `eps` (like mean) draws z = mean + σ·eps, None decodes the mean."""
        mean, logvar = self.encode_moments(video)
        z = mean if eps is None else mean + torch.exp(0.5 * logvar) * eps.to(mean.dtype)
        return self.decode(z, frames=video.shape[2]), mean, logvar

    def _check_video(self, video: torch.Tensor) -> None:
        _, ch, cw = self.arch.compression
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"the TAE takes video (B, 3, T, H, W), got {tuple(video.shape)}")
        if video.shape[3] % ch or video.shape[4] % cw:
            raise ValueError(f"H and W must be multiples of {ch}, got {tuple(video.shape[3:])}")
