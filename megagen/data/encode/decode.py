"""Decode a clip with DALI, falling back to PyAV for a codec DALI's backend refuses; never crash.

DALI's CPU backend decodes VP8/VP9 and MJPEG but not H.264/HEVC; its mixed (GPU) backend does. A clip DALI
fails on is tried with PyAV: if PyAV decodes it, the codec is DALI-refused from then on (logged once, the
rest of its clips go straight to PyAV); if PyAV fails too, the clip is corrupt.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from megagen.data.encode.video_dali import DaliVideoDecoder, dali_video_available
from megagen.data.encode.video_pyav import BadVideo, VideoInfo, decode_pyav, probe

TRUNCATED_BELOW = 0.9
"""A clip decoding fewer than this share of the frames its container declares is truncated."""
BACKENDS = ("auto", "dali", "pyav")
CODEC_REFUSED = "Failed to create video decoder"
"""What DALI says when its backend has no decoder for the codec (not when the bytes are bad)."""


@dataclass
class DecodedVideo:
    frames: np.ndarray
    """(N, H, W, 3) uint8 RGB."""
    fps: float
    backend: str
    """"dali" or "pyav": the summary's decoded_with."""


class VideoDecoder:
    """backend "auto": DALI when installed, PyAV for what it refuses; "dali" / "pyav": only that one."""

    def __init__(
        self, backend: str = "auto", device_id: int | None = None, log: Callable[[str], None] = print
    ):
        if backend not in BACKENDS:
            raise ValueError(f"decoder {backend!r} is not one of {', '.join(BACKENDS)}")
        if backend == "dali" and not dali_video_available():
            raise ValueError("decoder 'dali' needs NVIDIA DALI (pip install megagen[dali])")
        use_dali = backend == "dali" or (backend == "auto" and dali_video_available())
        self.dali = DaliVideoDecoder(device_id) if use_dali else None
        self.fallback = backend != "dali"
        self.refused: set[str] = set()
        """Codecs DALI's backend refused in this run: their clips go to PyAV."""
        self.log = log

    def decode(self, path: str, max_seconds: float | None = None) -> DecodedVideo:
        """The clip's frames (its first `max_seconds` when given: nothing later is decoded); BadVideo
        (corrupt / truncated / unsupported) for one that cannot be used."""
        info = probe(path)
        limit = None if max_seconds is None else math.ceil(max_seconds * info.fps) + 1
        frames, backend = self._frames(path, info, limit)
        expected = min(info.frames, limit or info.frames)
        if expected and len(frames) < TRUNCATED_BELOW * expected:
            raise BadVideo("truncated", f"only {len(frames)} of the {expected} frames it should have decode")
        return DecodedVideo(frames, info.fps, backend)

    def _frames(self, path: str, info: VideoInfo, limit: int | None) -> tuple[np.ndarray, str]:
        if self.dali is None or info.codec in self.refused:
            return decode_pyav(path, limit), "pyav"
        try:
            return self.dali.decode(path, limit), "dali"
        except Exception as exc:
            if not self.fallback:
                raise BadVideo("unsupported", f"DALI cannot decode it: {_last_line(exc)}") from None
            refused = CODEC_REFUSED in str(exc)
        frames = decode_pyav(path, limit)  # raises BadVideo("corrupt") when PyAV cannot either
        if refused:
            self.refused.add(info.codec)
            self.log(f"DALI's decoder refuses codec {info.codec}; its clips are decoded with PyAV")
        return frames, "pyav"


def _last_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return lines[-1][:160] if lines else type(exc).__name__
