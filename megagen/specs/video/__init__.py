"""Movie Gen Video spec (registers itself as `video`)."""

from megagen.specs.video.model import VideoArch, VideoBlock, VideoTransformer
from megagen.specs.video.spec import VIDEO_PRESETS, VIDEO_SPEC, VideoSpec, patchify, unpatchify

__all__ = [
    "VIDEO_PRESETS",
    "VIDEO_SPEC",
    "VideoArch",
    "VideoBlock",
    "VideoSpec",
    "VideoTransformer",
    "patchify",
    "unpatchify",
]
