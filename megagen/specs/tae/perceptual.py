"""The optional perceptual term's feature network: VGG16's convolutional trunk with the user's weights.

megagen ships no weights and downloads nothing: `tae.perceptual_weights` names a safetensors file holding
torchvision's `vgg16().features.state_dict()` (keys `0.weight`, `0.bias`, `2.weight`, ...). The network is
frozen; it reads frames in [-1, 1] and returns the activations before the fourth pooling.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from megagen.config import ConfigError

# VGG16 "D" layout: widths of the 3x3 convs, "M" = 2x2 max-pool; truncated after conv4_3
_VGG16_TRUNK = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class VGGFeatures(nn.Module):
    """Conv/ReLU/pool layers in torchvision's `features` index order, so its state-dict keys load as is."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        width = 3
        for item in _VGG16_TRUNK:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(width, item, 3, padding=1), nn.ReLU()]
                width = item
        self.features = nn.Sequential(*layers)
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = ((images + 1.0) / 2.0 - self.mean) / self.std
        return self.features(x)


@functools.lru_cache(maxsize=2)
def _load(path: str, device: str) -> VGGFeatures:
    from safetensors.torch import load_file

    net = VGGFeatures()
    try:
        tensors = load_file(path)
    except Exception as exc:  # noqa: BLE001 - name the config field, not a library traceback
        raise ConfigError("tae.perceptual_weights", f"{path}: unreadable safetensors: {exc}") from None
    missing, unexpected = net.features.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ConfigError(
            "tae.perceptual_weights", f"{path}: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
        )
    return net.to(device).eval().requires_grad_(False)


def perceptual_features(path: str, device: torch.device) -> VGGFeatures | None:
    """The frozen feature network of `tae.perceptual_weights`, or None (no perceptual term) when empty."""
    return _load(path, str(device)) if path else None
