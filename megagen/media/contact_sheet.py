"""A PNG grid (rows = samples, columns = evenly spaced frames) to glance at many samples at once."""

import functools
import logging

import numpy as np

log = logging.getLogger(__name__)


def frame_picks(frames: int, columns: int) -> np.ndarray:
    """Indices of `columns` evenly spaced frames, first and last included (repeats for short videos)."""
    return np.linspace(0, frames - 1, columns).round().astype(int)


def contact_sheet(videos: list[np.ndarray], columns: int = 8) -> np.ndarray:
    """Tile evenly spaced frames of each (T,H,W,3) uint8 video into one (rows*H, columns*W, 3) image.
    A video of exactly `columns` frames is used as it is, so callers may pass only the picked frames."""
    height, width = videos[0].shape[1:3]
    sheet = np.zeros((len(videos) * height, columns * width, 3), dtype=np.uint8)
    for row, video in enumerate(videos):
        for col, index in enumerate(frame_picks(len(video), columns)):
            sheet[row * height : (row + 1) * height, col * width : (col + 1) * width] = video[index]
    return sheet


@functools.cache
def _pillow_image():
    """PIL.Image, or None after one log line when Pillow is not installed."""
    try:
        from PIL import Image
    except ImportError:
        log.warning("Pillow not installed: contact sheets are skipped (pip install pillow)")
        return None
    return Image


def write_contact_sheet(path, videos: list[np.ndarray], columns: int = 8) -> bool:
    """Save the grid as PNG; returns False (one log line) when Pillow is not installed."""
    Image = _pillow_image()
    if Image is None:
        return False
    Image.fromarray(contact_sheet(videos, columns)).save(str(path))
    return True
