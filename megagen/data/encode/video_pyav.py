"""PyAV: the probe every clip goes through, and the decoder for codecs DALI's backend refuses.

The probe reads only the container header, so a file that is not a video is named bad before any decoder
is set up; the decoder is the baseline `benchmarks/encode.py` compares DALI with.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class BadVideo(Exception):
    """A clip that cannot be used; `reason` is the summary's key (corrupt, truncated, too_short, ...)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class VideoInfo:
    codec: str
    width: int
    height: int
    fps: float
    frames: int
    """Frames the container declares (0 when it does not say)."""


def probe(path: str) -> VideoInfo:
    """The first video stream's codec, size, frame rate and declared frame count; BadVideo otherwise."""
    import av

    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise BadVideo("unsupported", "no video stream")
            stream = container.streams.video[0]
            codec = stream.codec_context
            if codec is None or not stream.average_rate:
                raise BadVideo("corrupt", "the video stream has no codec or frame rate")
            frames = stream.frames
            if not frames and stream.duration and stream.time_base:
                frames = round(float(stream.duration * stream.time_base * stream.average_rate))
            if not frames and container.duration:  # WebM declares only the container's duration
                frames = round(container.duration / av.time_base * float(stream.average_rate))
            return VideoInfo(codec.name, stream.width, stream.height, float(stream.average_rate), frames)
    except BadVideo:
        raise
    except Exception as exc:  # PyAV raises a family of FFmpeg errors; each means "not a usable video"
        raise BadVideo("corrupt", f"cannot open: {exc}") from None


def decode_pyav(path: str, max_frames: int | None = None) -> np.ndarray:
    """The first `max_frames` frames (all when None) as (N, H, W, 3) uint8 RGB; BadVideo("corrupt") when
    decoding fails part-way."""
    import av

    frames = []
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except Exception as exc:
        raise BadVideo("corrupt", f"decoding failed: {exc}") from None
    if not frames:
        raise BadVideo("corrupt", "no frame decodes")
    return np.stack(frames)
