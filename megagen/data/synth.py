"""`megagen data synth`: a seeded synthetic shard dataset with learnable structure, in several buckets.

Like megagen/data/synthetic.py, every sample is one of `classes` (caption, video) pairs: its text
embeddings are the class's embeddings and its latents are the class's smooth pattern — a fixed sum of
sinusoids over (t, h, w) in [0, 1]³ evaluated on the bucket's grid, so one class looks alike in every
bucket (an image bucket sees its first frame). The flow-matching target is predictable from the text, so
the loss falls well below its starting value. `caption_id` is the class.

Presets: `video_tiny` (the video spec's tiny encoders); `audio_tiny` (1-D buckets `t{T}` of 128-channel
audio latents, plus `video_features` (Fv, Dv): the class's own smooth pattern over the clip's video frames,
Fv = round(T · 24 / 25)); `upsampler_tiny` (video buckets plus `lowres_latents`: the high-res pattern
averaged over 2×2 latent pixels and repeated back to the full grid — a blurred copy of the target);
`wan_tiny` (video buckets of the wan spec's tiny preset: 16-channel latents, one `umt5` text encoder);
`tae_tiny` (pixel clips (3, T, H, W) in [-1, 1] for the TAE spec, no text: per class a Gaussian blob
moving at constant speed over a linear colour gradient, so a small autoencoder learns it in a few steps).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from megagen.data.format import (
    CAPTION_ID,
    DEFAULT_SHARD_MB,
    DURATION,
    FORMAT_VERSION,
    FPS,
    LATENTS,
    SCALAR_FIELDS,
    TEXT_DTYPE,
    TEXT_LEN_DTYPE,
    TEXT_LEN_PREFIX,
    TEXT_PREFIX,
    bucket_name,
    parse_bucket_list,
)
from megagen.data.manifest import BucketInfo, FieldInfo, Manifest, TextEncoderInfo, standard_fields
from megagen.data.pack import PackResult
from megagen.data.shard_format import shard_file
from megagen.data.shard_writer import DatasetWriter, plan_shards
from megagen.data.synthetic import sample_seed


@dataclass(frozen=True)
class SynthPreset:
    spec: str
    spec_preset: str
    text_len: int
    """Padded text length (max_len) of every encoder."""
    buckets: str
    """Default buckets (video: a one-frame image bucket and two video buckets; audio: 1-D `t{T}`)."""


SYNTH_PRESETS = {
    "video_tiny": SynthPreset("video", "tiny", text_len=8, buckets="t1_h16_w16,t4_h8_w8,t8_h8_w12"),
    "audio_tiny": SynthPreset("audio", "tiny", text_len=8, buckets="t32,t48"),
    "upsampler_tiny": SynthPreset("upsampler", "tiny", text_len=8, buckets="t4_h8_w8,t8_h8_w12"),
    "wan_tiny": SynthPreset("wan", "tiny", text_len=8, buckets="t1_h16_w16,t4_h8_w8,t8_h8_w12"),
    "tae_tiny": SynthPreset("tae", "tiny", text_len=8, buckets="t1_h32_w32,t16_h32_w32"),
}
VIDEO_FEATURES = "video_features"
LOWRES_LATENTS = "lowres_latents"
VIDEO_FPS = (16.0, 24.0)
TAE_TEMPORAL_STRIDE = 8
"""Frames per latent frame (Movie Gen's TAE): a video of T latent frames at fps lasts T·8/fps seconds."""


def _class_rng(seed: int, cls: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(sample_seed(seed, -2, cls, stream))


def class_latent(seed: int, cls: int, latent_shape: tuple[int, ...], stream: int = 0) -> np.ndarray:
    """Class `cls`'s pattern on a (C, T, H, W) (or (C, T)) grid: per channel two random sinusoids, unit
    variance. `stream` picks an independent pattern of the class (another field)."""
    channels, *spatial = latent_shape
    rng = _class_rng(seed, cls, stream)
    freqs = rng.integers(0, 3, size=(channels, 2, 3)).astype(np.float64)
    phases = rng.uniform(0, 2 * math.pi, size=(channels, 2))
    coords = np.meshgrid(*[np.linspace(0, 1, n) if n > 1 else np.zeros(1) for n in spatial], indexing="ij")
    out = np.zeros(latent_shape)
    for c in range(channels):
        for k in range(2):
            arg = sum(f * x for f, x in zip(freqs[c, k], coords)) * 2 * math.pi + phases[c, k]
            out[c] += np.cos(arg)
    std = out.std()
    return ((out - out.mean()) / (std if std > 1e-6 else 1.0)).astype(np.float32)


def class_clip(seed: int, cls: int, shape: tuple[int, int, int, int]) -> np.ndarray:
    """Class `cls`'s pixel clip (3, T, H, W) in [-1, 1]: a blob moving in a straight line over a gradient."""
    channels, t, h, w = shape
    rng = _class_rng(seed, cls, 200)
    axes = [np.linspace(0, 1, t) if t > 1 else np.zeros(1), np.linspace(-1, 1, h), np.linspace(-1, 1, w)]
    tt, yy, xx = np.meshgrid(*axes, indexing="ij")
    start, velocity = rng.uniform(-0.5, 0.5, 2), rng.uniform(-0.5, 0.5, 2)
    dist2 = (yy - start[0] - velocity[0] * tt) ** 2 + (xx - start[1] - velocity[1] * tt) ** 2
    blob = np.exp(-dist2 / (2 * 0.3**2))
    out = np.zeros(shape)
    for c in range(channels):
        angle = rng.uniform(0, 2 * math.pi)
        gradient = math.cos(angle) * xx + math.sin(angle) * yy
        out[c] = 0.4 * gradient + rng.uniform(-1, 1) * blob + rng.uniform(-0.3, 0.3)
    return np.clip(out, -1, 1).astype(np.float32)


def sample_channels(p: SynthPreset, arch) -> int:
    """Channels of a sample's `latents` field: RGB pixels for the TAE, latent channels otherwise."""
    return 3 if p.spec == "tae" else arch.latent_channels


def class_sample(p: SynthPreset, seed: int, cls: int, shape: tuple[int, ...]) -> np.ndarray:
    """Class `cls`'s `latents` field on `shape`: a pixel clip for the TAE, a latent pattern otherwise."""
    return class_clip(seed, cls, shape) if p.spec == "tae" else class_latent(seed, cls, shape)


def class_text(
    seed: int, cls: int, encoders: dict[str, TextEncoderInfo]
) -> dict[str, tuple[np.ndarray, int]]:
    """Class `cls`'s embeddings per encoder: (max_len, dim) with zeros after its length, and the length."""
    out = {}
    for j, (enc, info) in enumerate(encoders.items()):
        rng = _class_rng(seed, cls, 1 + j)
        length = int(rng.integers(max(1, info.max_len // 2), info.max_len + 1))
        emb = np.zeros((info.max_len, info.dim), dtype=np.float32)
        emb[:length] = rng.standard_normal((length, info.dim))
        out[enc] = (emb, length)
    return out


def _audio_video_frames(arch, frames: int) -> int:
    return max(1, round(frames * arch.video_rate / arch.audio_rate))


def lowres_of(latent: np.ndarray) -> np.ndarray:
    """A (C, T, H, W) latent averaged over 2×2 pixels and repeated back to (H, W) (odd edges kept as is)."""
    c, t, h, w = latent.shape
    h2, w2 = h - h % 2, w - w % 2
    out = latent.astype(np.float32).copy()
    blocks = out[:, :, :h2, :w2].reshape(c, t, h2 // 2, 2, w2 // 2, 2).mean(axis=(3, 5))
    out[:, :, :h2, :w2] = np.repeat(np.repeat(blocks, 2, axis=2), 2, axis=3)
    return out


def class_extras(p: SynthPreset, arch, seed: int, cls: int, pattern: np.ndarray) -> dict[str, np.ndarray]:
    """The spec-specific fields of class `cls` in a bucket whose latent pattern is `pattern`."""
    if p.spec == "audio":
        frames = _audio_video_frames(arch, pattern.shape[1])
        feats = class_latent(seed, cls, (arch.video_dim, frames), stream=100).T
        return {VIDEO_FEATURES: np.ascontiguousarray(feats)}
    if p.spec == "upsampler":
        return {LOWRES_LATENTS: lowres_of(pattern)}
    return {}


@dataclass
class _SynthJob:
    """What every bucket of one `synth` run is built from."""

    preset: SynthPreset
    arch: object
    """The spec preset's architecture (latent channels, text encoders, audio/video rates)."""
    seed: int
    classes: int
    encoders: dict[str, TextEncoderInfo]
    texts: list[dict[str, tuple[np.ndarray, int]]]
    """Per class: each encoder's (embedding, length)."""
    fields: dict[str, FieldInfo]
    """The dataset's fields; each bucket adds its extra fields."""


def synth(
    out: str | os.PathLike,
    preset: str = "video_tiny",
    samples: int = 64,
    buckets: str | None = None,
    seed: int = 0,
    shard_mb: float = DEFAULT_SHARD_MB,
    classes: int = 8,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> PackResult:
    """Write `samples` synthetic samples split evenly over `buckets` (names `t{T}_h{H}_w{W}`, default the
    preset's) into the dataset directory `out`. Deterministic in (seed, preset, buckets, samples, classes).
    `overwrite` replaces a different dataset already in `out`; an interrupted run resumes."""
    log = log or (lambda msg: None)
    job, thws = _synth_job(preset, samples, buckets, seed, shard_mb, classes)
    options = dict(
        preset=preset,
        samples=samples,
        buckets=thws,
        seed=seed,
        shard_mb=shard_mb,
        classes=classes,
        version=FORMAT_VERSION,
    )
    key = "synth:" + hashlib.sha256(json.dumps(options).encode()).hexdigest()
    writer = DatasetWriter(out, key, overwrite=overwrite)
    bucket_infos = []
    fps_values: set[float] = set()
    for bi, thw in enumerate(thws):
        n = samples // len(thws) + (bi < samples % len(thws))
        bucket_infos.append(_write_bucket(writer, job, bi, thw, n, shard_mb, fps_values, log))
    manifest = Manifest(
        spec=job.preset.spec,
        latent_channels=sample_channels(job.preset, job.arch),
        latent_dtype="float16",
        text_encoders=job.encoders,
        fps_values=sorted(fps_values),
        fields=job.fields,
        buckets=bucket_infos,
    )
    writer.finish(manifest)
    return PackResult(manifest, os.fspath(out), writer.written, writer.reused, [])


def _synth_job(
    preset: str, samples: int, buckets: str | None, seed: int, shard_mb: float, classes: int
) -> tuple[_SynthJob, list[tuple[int, ...]]]:
    """Check the arguments; the job and its buckets' (T, H, W) (or (T,))."""
    from megagen.specs import get_spec

    if preset not in SYNTH_PRESETS:
        raise ValueError(f"unknown synth preset {preset!r}; presets: {', '.join(SYNTH_PRESETS)}")
    if samples < 1 or classes < 1:
        raise ValueError("samples and classes must be positive")
    if shard_mb <= 0:
        raise ValueError(f"shard size must be positive, got {shard_mb} MB")
    p = SYNTH_PRESETS[preset]
    arch = get_spec(p.spec).presets[p.spec_preset]
    encoders = {enc: TextEncoderInfo(dim=dim, max_len=p.text_len) for enc, dim in arch.text_encoders.items()}
    thws = parse_bucket_list(buckets or p.buckets)
    rank = 1 if p.spec == "audio" else 3
    if any(len(thw) != rank for thw in thws):
        form = "t<T>" if rank == 1 else "t<T>_h<H>_w<W>"
        raise ValueError(f"preset {preset} needs {form} buckets, got {buckets!r}")
    if samples < len(thws):
        raise ValueError(f"{samples} samples cannot fill {len(thws)} buckets")
    fields = standard_fields("float16", encoders)
    texts = [class_text(seed, c, encoders) for c in range(classes)]
    return _SynthJob(p, arch, seed, classes, encoders, texts, fields), thws


def _fps_and_duration(
    job: _SynthJob, thw: tuple[int, ...], cls_all: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    n = len(cls_all)
    if job.preset.spec == "audio":  # the clip's video frame rate; duration from the 25 Hz latent rate
        return np.full(n, float(job.arch.video_rate)), thw[0] / np.full(n, float(job.arch.audio_rate))
    if thw[0] == 1:  # an image: no frame rate, no duration
        return np.zeros(n), np.zeros(n)
    fps_all = np.array([VIDEO_FPS[c % len(VIDEO_FPS)] for c in cls_all])
    frames = thw[0] if job.preset.spec == "tae" else thw[0] * TAE_TEMPORAL_STRIDE  # TAE samples are pixels
    return fps_all, frames / fps_all


def _write_bucket(
    writer: DatasetWriter,
    job: _SynthJob,
    bi: int,
    thw: tuple[int, ...],
    n: int,
    shard_mb: float,
    fps_values: set[float],
    log: Callable[[str], None],
) -> BucketInfo:
    """Write (or keep, when resuming) the `n` samples of bucket number `bi`; adds its frame rates to
    `fps_values` and its extra fields to `job.fields`."""
    latent_shape = (sample_channels(job.preset, job.arch), *thw)
    name = bucket_name(latent_shape)
    patterns = [
        class_sample(job.preset, job.seed, c, latent_shape).astype(np.float16) for c in range(job.classes)
    ]
    extras = [
        {
            k: v.astype(np.float16)
            for k, v in class_extras(job.preset, job.arch, job.seed, c, patterns[c]).items()
        }
        for c in range(job.classes)
    ]
    field_shapes = {k: tuple(v.shape) for k, v in extras[0].items()}
    for k in field_shapes:
        job.fields[k] = FieldInfo("float16", None)
    sample_bytes = sum(
        math.prod(latent_shape if f.per_sample_shape is None else f.per_sample_shape)
        * np.dtype(f.dtype).itemsize
        for k, f in job.fields.items()
        if k not in field_shapes
    ) + sum(math.prod(shape) * 2 for shape in field_shapes.values())
    info_b = BucketInfo(name, latent_shape, n, [], field_shapes)
    cls_all = np.array([sample_seed(job.seed, bi, i, stream=1) % job.classes for i in range(n)])
    fps_all, duration_all = _fps_and_duration(job, thw, cls_all)
    fps_values.update(float(x) for x in fps_all)
    for k, (a, z) in enumerate(plan_shards(n, sample_bytes, shard_mb * 1024 * 1024)):
        file = shard_file(name, k)
        info = writer.completed(file, z - a)
        if info is None:
            cls = cls_all[a:z]
            arrays = _shard_arrays(job, cls, patterns, extras, fps_all[a:z], duration_all[a:z])
            info = writer.write(file, name, arrays)
            log(f"wrote {file} ({info.samples} samples, {info.bytes / 2**20:.2f} MB)")
        info_b.shards.append(info)
    return info_b


def _shard_arrays(
    job: _SynthJob,
    cls: np.ndarray,
    patterns: list[np.ndarray],
    extras: list[dict[str, np.ndarray]],
    fps: np.ndarray,
    duration: np.ndarray,
) -> dict[str, np.ndarray]:
    """One shard's arrays for samples of classes `cls`: each sample is its class's pattern and text."""
    arrays = {
        LATENTS: np.stack([patterns[c] for c in cls]),
        FPS: fps.astype(SCALAR_FIELDS[FPS]),
        DURATION: duration.astype(SCALAR_FIELDS[DURATION]),
        CAPTION_ID: cls.astype(SCALAR_FIELDS[CAPTION_ID]),
    }
    for key in extras[0]:
        arrays[key] = np.stack([extras[c][key] for c in cls])
    for enc in job.encoders:
        arrays[TEXT_PREFIX + enc] = np.stack([job.texts[c][enc][0] for c in cls]).astype(TEXT_DTYPE)
        arrays[TEXT_LEN_PREFIX + enc] = np.array([job.texts[c][enc][1] for c in cls], dtype=TEXT_LEN_DTYPE)
    return arrays
