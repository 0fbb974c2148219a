"""Write decoded frames to MP4 so sampled latents can be watched; PyAV is imported lazily (optional extra)."""

import functools
import logging
from fractions import Fraction

import numpy as np

log = logging.getLogger(__name__)


@functools.cache
def _pyav():
    """The `av` module, or None after one log line (not one per file) when it is not installed."""
    try:
        import av
    except ImportError:
        log.warning("PyAV (av) not installed: MP4 files are skipped (pip install av)")
        return None
    return av


def write_video(path, frames: np.ndarray, fps: float, codec: str = "libx264") -> bool:
    """Encode (T,H,W,3) uint8 frames with `codec` (H.264 by default; the container follows the path's
    suffix) at `fps` (fractional rates such as 23.976 kept); returns False (one log line) when PyAV is
    not installed."""
    av = _pyav()
    if av is None:
        return False
    frames = np.ascontiguousarray(frames, dtype=np.uint8)
    _, height, width, _ = frames.shape
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(float(fps)).limit_denominator(1001))
        stream.width, stream.height = width - width % 2, height - height % 2
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        for frame in frames:
            image = av.VideoFrame.from_ndarray(frame[: stream.height, : stream.width], format="rgb24")
            for packet in stream.encode(image):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return True
