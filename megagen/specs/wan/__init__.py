"""Wan 2.1 spec (registers itself as `wan`): diffusers' WanTransformer3DModel as a megagen model."""

from megagen.specs.wan.model import WanArch, WanBlock, WanTransformer
from megagen.specs.wan.spec import WAN_PRESETS, WAN_SPEC, WanSpec

__all__ = ["WAN_PRESETS", "WAN_SPEC", "WanArch", "WanBlock", "WanSpec", "WanTransformer"]
