"""Movie Gen spatial upsampler spec (registers itself as `upsampler`)."""

from megagen.specs.upsampler.model import UpsamplerTransformer, upsampler_from_parent
from megagen.specs.upsampler.multidiffusion import (
    blend_weights,
    multidiffusion_sample,
    window_profile,
    window_spans,
    windowed_velocity,
)
from megagen.specs.upsampler.spec import LOWRES, UPSAMPLER_PRESETS, UPSAMPLER_SPEC, UpsamplerSpec

__all__ = [
    "LOWRES",
    "UPSAMPLER_PRESETS",
    "UPSAMPLER_SPEC",
    "UpsamplerSpec",
    "UpsamplerTransformer",
    "blend_weights",
    "multidiffusion_sample",
    "window_profile",
    "window_spans",
    "upsampler_from_parent",
    "windowed_velocity",
]
