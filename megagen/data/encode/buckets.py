"""Pixel-space buckets: (width × height, duration) pairs a clip is resized, cropped and cut to.

Every clip of a bucket then has one latent shape, so the trainer batches it without padding. Movie Gen
trains on five aspect ratios and durations of 4–16 s; `tiny` is small enough for tests on a CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PRESETS = {
    "moviegen": "1024x576,576x1024,768x768,896x640,640x896@4,6,8,12,16",
    "tiny": "64x64,96x64@0.5,1",
}
"""Named bucket sets, in the `--buckets` syntax: sizes `WxH` comma-separated, `@`, durations in seconds."""


@dataclass(frozen=True)
class PixelBucket:
    width: int
    height: int
    duration: float
    """Seconds of video; frames = duration × fps."""

    def frames(self, fps: float) -> int:
        return max(1, round(self.duration * fps))


@dataclass(frozen=True)
class BucketSet:
    sizes: tuple[tuple[int, int], ...]
    durations: tuple[float, ...]

    def choose(self, width: int, height: int, seconds: float) -> PixelBucket | None:
        """The size nearest in aspect ratio and the longest duration the clip covers; None when the clip is
        shorter than every duration."""
        fits = [d for d in self.durations if d <= seconds + 1e-6]
        if not fits:
            return None
        aspect = math.log(width / height)
        w, h = min(self.sizes, key=lambda s: (abs(math.log(s[0] / s[1]) - aspect), s))
        return PixelBucket(w, h, max(fits))


def parse_buckets(text: str) -> BucketSet:
    """A preset name or `W1xH1,W2xH2@D1,D2` → BucketSet; ValueError saying what is wrong."""
    text = PRESETS.get(text.strip(), text.strip())
    sizes_text, sep, durations_text = text.partition("@")
    if not sep:
        raise ValueError(f"buckets {text!r}: expected a preset ({', '.join(PRESETS)}) or WxH,...@SECONDS,...")
    try:
        sizes = tuple(tuple(int(v) for v in part.lower().split("x")) for part in sizes_text.split(","))
        durations = tuple(sorted(float(d) for d in durations_text.split(",")))
    except ValueError:
        raise ValueError(f"buckets {text!r}: sizes must be WxH integers, durations numbers") from None
    for size in sizes:
        if len(size) != 2 or min(size) < 8 or size[0] % 8 or size[1] % 8:
            raise ValueError(
                f"bucket size {size} must be W x H, each a positive multiple of 8 (the TAE's 8x)"
            )
    if min(durations) <= 0:
        raise ValueError(f"bucket durations {durations} must be positive")
    return BucketSet(sizes, durations)  # type: ignore[arg-type]
