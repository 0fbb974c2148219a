"""The latent-shard dataset format: names, constants, bucket naming and the one error type.

A dataset directory holds `manifest.json` and, per bucket, a few large safetensors shard files
(`<bucket>/shard-00000.safetensors`, ...). docs/data-format.md is the specification; this module is its
executable half (with megagen/data/manifest.py for `manifest.json` and megagen/data/shard_format.py for a
shard's bytes). Everything here is plain Python so that tools without megagen can follow it.
"""

from __future__ import annotations

import math
import re

FORMAT_NAME = "megagen-latent-shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
PROGRESS_NAME = ".pack-progress.json"
SHARD_SUFFIX = ".safetensors"
DEFAULT_SHARD_MB = 256.0

LATENTS = "latents"
TEXT_PREFIX = "text."
TEXT_LEN_PREFIX = "text_len."
FPS = "fps"
DURATION = "duration"
CAPTION_ID = "caption_id"

TEXT_DTYPE = "float16"
TEXT_LEN_DTYPE = "int32"
SCALAR_FIELDS = {FPS: "float32", DURATION: "float32", CAPTION_ID: "int64"}
"""Per-sample scalars every dataset stores (shape [] per sample)."""

LATENT_DTYPES = ("float16", "float32")

_BUCKET_RE = re.compile(r"^t(\d+)_h(\d+)_w(\d+)$")
_BUCKET_1D_RE = re.compile(r"^t(\d+)$")


class DataError(Exception):
    """Bad data, named: `file` (path), and `sample` (index within `bucket`) when it concerns one sample."""

    def __init__(
        self, message: str, file: str | None = None, sample: int | None = None, bucket: str | None = None
    ):
        self.file, self.sample, self.bucket, self.reason = file, sample, bucket, message
        where = []
        if file:
            where.append(str(file))
        if sample is not None:
            where.append(f"sample {sample}" + (f" of bucket {bucket}" if bucket else ""))
        super().__init__(": ".join([*where, message]))


class SampleSkipped(DataError):
    """Raised by `ShardReader.read` in `on_error="skip"` mode for a sample that cannot be used.

    Loaders catch exactly this class, log it and count it in metrics, and carry on without the sample;
    every other `DataError` is fatal.
    """


def first_problem(problems: list[DataError], total: int, dataset: str) -> DataError:
    """One DataError for a start-up check that found `total` problems: the first, with the count of the
    others and where they are all listed."""
    first = problems[0]
    if total <= 1:
        return first
    more = f" (and {total - 1} more problem(s); `megagen data check {dataset}` lists all)"
    return DataError(first.reason + more, file=first.file, sample=first.sample, bucket=first.bucket)


def bucket_name(latent_shape: tuple[int, ...] | list[int]) -> str:
    """`t{T}_h{H}_w{W}` for a (C, T, H, W) latent shape; `t{T}` for a 1-D (C, T) latent (audio)."""
    if len(latent_shape) == 2:
        return f"t{latent_shape[1]}"
    if len(latent_shape) != 4:
        raise ValueError(f"latent shape {tuple(latent_shape)} is not (C, T, H, W) or (C, T)")
    _, t, h, w = latent_shape
    return f"t{t}_h{h}_w{w}"


def parse_bucket_name(name: str) -> tuple[int, ...]:
    """(T, H, W) of a `t{T}_h{H}_w{W}` bucket name, (T,) of a 1-D `t{T}` one; ValueError otherwise."""
    m = _BUCKET_RE.match(name.strip()) or _BUCKET_1D_RE.match(name.strip())
    if not m or min(int(g) for g in m.groups()) < 1:
        raise ValueError(
            f"bucket {name!r} is not of the form t<T>_h<H>_w<W> (or t<T> for 1-D latents) with positive sizes"
        )
    return tuple(int(g) for g in m.groups())


def parse_bucket_list(text: str) -> list[tuple[int, ...]]:
    """Comma-separated bucket names → list of (T, H, W) or (T,), duplicates removed, order kept."""
    out: list[tuple[int, ...]] = []
    for part in text.split(","):
        if part.strip():
            thw = parse_bucket_name(part)
            if thw not in out:
                out.append(thw)
    if not out:
        raise ValueError("empty bucket list")
    if len({len(thw) for thw in out}) > 1:
        raise ValueError(f"bucket list {text!r} mixes 1-D (t<T>) and video (t<T>_h<H>_w<W>) buckets")
    return out


def tokens_per_sample(latent_shape: tuple[int, ...] | list[int], patch: tuple[int, ...] = (1, 2, 2)) -> int:
    """Transformer tokens of one latent (C, T, H, W) under a (pt, ph, pw) patch: T/pt · H/ph · W/pw."""
    return math.prod(n // p for n, p in zip(latent_shape[1:], patch))
