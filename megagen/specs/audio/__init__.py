"""Movie Gen Audio spec (registers itself as `audio`)."""

from megagen.specs.audio.model import AudioArch, AudioBlock, AudioTransformer
from megagen.specs.audio.spec import (
    AUDIO_PRESETS,
    AUDIO_SPEC,
    CONTEXT_MASK,
    VIDEO_FEATURES,
    AudioSpec,
    draw_context_mask,
    resample_frames,
)

__all__ = [
    "AUDIO_PRESETS",
    "AUDIO_SPEC",
    "CONTEXT_MASK",
    "VIDEO_FEATURES",
    "AudioArch",
    "AudioBlock",
    "AudioSpec",
    "AudioTransformer",
    "draw_context_mask",
    "resample_frames",
]
