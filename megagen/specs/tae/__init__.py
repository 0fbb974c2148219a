"""Movie Gen's temporal autoencoder (registers itself as `tae`); tiled encode/decode and loading."""

from megagen.specs.tae.load import load_tae, tiny_tae_for_tests
from megagen.specs.tae.model import TAE, TAEArch
from megagen.specs.tae.spec import TAE_PRESETS, TAE_SPEC, TAESpec
from megagen.specs.tae.tiling import blend_weights, decode_spans, decode_tiled, encode_tiled

__all__ = [
    "TAE",
    "TAEArch",
    "TAE_PRESETS",
    "TAE_SPEC",
    "TAESpec",
    "blend_weights",
    "decode_spans",
    "decode_tiled",
    "encode_tiled",
    "load_tae",
    "tiny_tae_for_tests",
]
