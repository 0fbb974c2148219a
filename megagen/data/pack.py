"""`megagen data pack`: per-sample latents + text embeddings + metadata.jsonl → a bucketed shard dataset.

SRC/metadata.jsonl has one JSON object per line:

    {"id": "clip-0001", "latent": "latents/clip-0001.npy", "text": {"ul2": "text/ul2/clip-0001.npy", ...},
     "fps": 24, "duration": 10.6, "caption_id": 17, "fields": {"name": "extra/clip-0001.npy"}}

Paths are relative to SRC (or absolute); arrays are `.npy` or `.safetensors` files. `fps`, `duration`,
`caption_id` and `fields` are optional. A latent is (C, T, H, W), an image (C, H, W) = one frame, or a 1-D
sequence (C, T) (audio); a text embedding is (L, D). An extra field with exactly the latent's shape in every
sample (e.g. the upsampler's `lowres_latents`) is bucketed and cropped with the latent. See
docs/data-format.md, section "Packing".
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from megagen.data.format import (
    CAPTION_ID,
    DEFAULT_SHARD_MB,
    DURATION,
    FORMAT_VERSION,
    FPS,
    LATENT_DTYPES,
    LATENTS,
    SCALAR_FIELDS,
    TEXT_DTYPE,
    TEXT_LEN_DTYPE,
    TEXT_LEN_PREFIX,
    TEXT_PREFIX,
    DataError,
    bucket_name,
    parse_bucket_list,
)
from megagen.data.manifest import BucketInfo, FieldInfo, Manifest, TextEncoderInfo, standard_fields
from megagen.data.pack_sources import (
    LATENT_TENSOR_NAMES,
    METADATA_NAME,
    SourceLayout,
    SourceSample,
    load_array,
    parse_max_len,
    probe_sources,
    read_metadata,
)
from megagen.data.shard_format import shard_file
from megagen.data.shard_writer import DatasetWriter, plan_shards


@dataclass
class PackResult:
    manifest: Manifest
    out: str
    written: list[str] = field(default_factory=list)
    """Shard files written by this run."""
    reused: list[str] = field(default_factory=list)
    """Shard files kept from an interrupted earlier run (resume)."""
    dropped: list[str] = field(default_factory=list)
    """Sample ids left out by `drop_unfit`."""


@dataclass
class _Packing:
    """The decided layout of the dataset being packed: what every shard of it is built from."""

    spec: str
    channels: int
    latent_dtype: str
    text_encoders: dict[str, TextEncoderInfo]
    fields: dict[str, FieldInfo]
    bucket_field_shapes: dict[str, dict[str, tuple[int, ...]]]
    latent_like: set[str] = field(default_factory=set)
    """Extra fields shaped exactly like their sample's latent: bucketed (and cropped) with it."""


def pack(
    src: str | os.PathLike,
    out: str | os.PathLike,
    buckets: str | list[tuple[int, int, int]] | None = None,
    shard_mb: float = DEFAULT_SHARD_MB,
    max_len: str | int | dict[str, int] | None = None,
    latent_dtype: str = "float16",
    spec: str = "video",
    drop_unfit: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> PackResult:
    """Pack SRC (metadata.jsonl + per-sample arrays) into the shard dataset OUT; resumes an interrupted run.

    buckets: None → one bucket per distinct latent shape; else bucket names (`"t4_h32_w32,t1_h64_w64"` or
    a list of (T, H, W)): a latent goes to the listed bucket of its exact shape, else to the largest listed
    bucket that fits inside it, cropped (leading frames, centred window); a latent that fits none is an
    error naming the sample, or left out with `drop_unfit`.
    max_len: text padding length, one int for every encoder or {encoder: int}; default the dataset's max.
    overwrite: replace a different dataset already in OUT (rerunning the same pack never needs it).
    """
    src, out = os.fspath(src), os.fspath(out)
    log = log or (lambda msg: None)
    if latent_dtype not in LATENT_DTYPES:
        raise ValueError(f"latent dtype {latent_dtype!r} is not one of {', '.join(LATENT_DTYPES)}")
    if shard_mb <= 0:
        raise ValueError(f"shard size must be positive, got {shard_mb} MB")
    rules = parse_bucket_list(buckets) if isinstance(buckets, str) else buckets
    max_len_arg = parse_max_len(max_len)
    sources = read_metadata(src)
    layout = probe_sources(sources)
    text_encoders = _text_encoders(sources, layout, max_len_arg)
    latent_like = _latent_like(sources, layout)
    _check_rule_rank(rules, layout.latent_rank)
    by_bucket, dropped = assign_buckets(sources, rules, int(layout.channels), latent_like, drop_unfit, src)
    kept = [s for members in by_bucket.values() for s in members]
    fields, bucket_field_shapes = _dataset_fields(latent_dtype, text_encoders, layout, by_bucket)
    packing = _Packing(
        spec, int(layout.channels), latent_dtype, text_encoders, fields, bucket_field_shapes, latent_like
    )
    key = _plan_key(src, rules, shard_mb, text_encoders, latent_dtype, spec, drop_unfit)
    writer = DatasetWriter(out, key, overwrite=overwrite)
    bucket_infos = [
        _write_bucket(writer, packing, b, members, shard_mb, log) for b, members in by_bucket.items()
    ]
    manifest = Manifest(
        spec=spec,
        latent_channels=packing.channels,
        latent_dtype=latent_dtype,
        text_encoders=text_encoders,
        fps_values=sorted({s.fps for s in kept}),
        fields=fields,
        buckets=bucket_infos,
    )
    writer.finish(manifest)
    return PackResult(manifest, out, writer.written, writer.reused, dropped)


# ---------------------------------------------------------------------------------------------------------
# The steps of `pack`


def _text_encoders(
    sources: list[SourceSample], layout: SourceLayout, max_len: int | dict[str, int] | None
) -> dict[str, TextEncoderInfo]:
    """Each encoder's padded length (`max_len`, default the longest embedding); a longer one is an error."""
    text_encoders: dict[str, TextEncoderInfo] = {}
    for enc in layout.encoders:
        longest = max(s.text_lens[enc] for s in sources)
        limit = max_len.get(enc, longest) if isinstance(max_len, dict) else (max_len or longest)
        if limit < 1:
            raise ValueError(f"max length of {enc} must be positive")
        for s in sources:
            if s.text_lens[enc] > limit:
                raise DataError(
                    f"sample {s.id} ({METADATA_NAME}:{s.line}): text.{enc} has {s.text_lens[enc]} tokens, "
                    f"more than the max length {limit}",
                    file=s.text[enc],
                )
        text_encoders[enc] = TextEncoderInfo(dim=layout.text_dims[enc], max_len=limit)
    return text_encoders


def _fit_bucket(shape: tuple[int, ...], rules: list[tuple[int, int, int]]) -> tuple[int, int, int] | None:
    """The listed (T, H, W) equal to the latent's, else the largest fitting inside it (to be cropped)."""
    thw = tuple(shape[1:])
    if thw in rules:
        return thw  # type: ignore[return-value]
    fits = [r for r in rules if all(a <= b for a, b in zip(r, thw))]
    return max(fits, key=lambda r: (math.prod(r), r)) if fits else None


def _crop(latent: np.ndarray, thw: tuple[int, ...]) -> np.ndarray:
    """Leading T frames, centred H×W window (1-D latents: leading T frames)."""
    if len(thw) == 1:
        return latent[:, : thw[0]]
    t, h, w = thw
    _, T, H, W = latent.shape
    h0, w0 = (H - h) // 2, (W - w) // 2
    return latent[:, :t, h0 : h0 + h, w0 : w0 + w]


def assign_buckets(
    sources: list[SourceSample],
    rules: list[tuple[int, ...]] | None,
    channels: int,
    latent_like: set[str],
    drop_unfit: bool,
    src: str,
) -> tuple[dict[str, list[SourceSample]], list[str]]:
    """Bucket → its samples (buckets ordered by (T, H, W), samples in file order), and the ids left out
    by `drop_unfit`. `rules` None: one bucket per latent shape; else see `pack`."""
    dropped: list[str] = []
    kept: list[SourceSample] = []
    for s in sources:
        thw = tuple(s.latent_shape[1:]) if rules is None else _fit_bucket(s.latent_shape, rules)
        if thw is None:
            if drop_unfit:
                dropped.append(s.id)
                continue
            names = ", ".join(bucket_name((0, *r)) for r in rules)
            raise DataError(
                f"sample {s.id} ({METADATA_NAME}:{s.line}): latent {list(s.latent_shape)} fits none of the "
                f"buckets {names} (use --drop-unfit to leave such samples out)",
                file=s.latent,
            )
        s.thw, s.bucket = thw, bucket_name((channels, *thw))
        for name in latent_like:
            s.extra_shapes[name] = (channels, *thw)
        kept.append(s)
    if not kept:
        raise DataError("no sample fits the bucket rules", file=os.path.join(src, METADATA_NAME))
    by_bucket: dict[str, list[SourceSample]] = {}
    for s in sorted(kept, key=lambda s: (s.thw, s.line)):
        by_bucket.setdefault(s.bucket, []).append(s)
    return by_bucket, dropped


def _dataset_fields(
    latent_dtype: str,
    text_encoders: dict[str, TextEncoderInfo],
    layout: SourceLayout,
    by_bucket: dict[str, list[SourceSample]],
) -> tuple[dict[str, FieldInfo], dict[str, dict[str, tuple[int, ...]]]]:
    """The manifest's fields: the standard ones, then each extra field with one shape for the dataset or,
    failing that, one per bucket (returned per bucket)."""
    fields = standard_fields(latent_dtype, text_encoders)
    bucket_field_shapes: dict[str, dict[str, tuple[int, ...]]] = {b: {} for b in by_bucket}
    kept = [s for members in by_bucket.values() for s in members]
    for name in layout.extra_names:
        dtype = layout.extra_dtypes[name]
        shapes = {s.extra_shapes[name] for s in kept}
        if len(shapes) == 1:
            fields[name] = FieldInfo(dtype, next(iter(shapes)))
            continue
        fields[name] = FieldInfo(dtype, None)
        for b, members in by_bucket.items():
            bshapes = {s.extra_shapes[name] for s in members}
            if len(bshapes) != 1:
                raise DataError(
                    f"field {name!r} has shapes {sorted(bshapes)} within bucket {b}; it must be one "
                    "shape per dataset or per bucket"
                )
            bucket_field_shapes[b][name] = next(iter(bshapes))
    return fields, bucket_field_shapes


def _latent_like(sources: list[SourceSample], layout: SourceLayout) -> set[str]:
    """Extra fields shaped exactly like their sample's latent in every sample (bucketed with it)."""
    return {
        name
        for name in layout.extra_names
        if all(s.extra_shapes[name] == s.raw_latent_shape for s in sources)
    }


def _check_rule_rank(rules: list[tuple[int, ...]] | None, latent_rank: int) -> None:
    if rules is not None and any(len(r) != latent_rank - 1 for r in rules):
        form = "t<T>" if latent_rank == 2 else "t<T>_h<H>_w<W>"
        raise ValueError(f"the latents are {latent_rank}-D: bucket rules must be {form}")


def _plan_key(
    src: str,
    rules: list[tuple[int, ...]] | None,
    shard_mb: float,
    text_encoders: dict[str, TextEncoderInfo],
    latent_dtype: str,
    spec: str,
    drop_unfit: bool,
) -> str:
    """The resume key: the options and metadata.jsonl's bytes (a rerun with both unchanged resumes)."""
    options = {
        "buckets": None if rules is None else [list(r) for r in rules],
        "shard_mb": shard_mb,
        "max_len": {k: v.max_len for k, v in text_encoders.items()},
        "latent_dtype": latent_dtype,
        "spec": spec,
        "drop_unfit": drop_unfit,
        "format_version": FORMAT_VERSION,
        "src": os.path.abspath(src),
    }
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    with open(os.path.join(src, METADATA_NAME), "rb") as f:
        digest.update(f.read())
    return "pack:" + digest.hexdigest()


def _write_bucket(
    writer: DatasetWriter,
    packing: _Packing,
    bucket: str,
    members: list[SourceSample],
    shard_mb: float,
    log: Callable[[str], None],
) -> BucketInfo:
    """Write (or keep, when resuming) the shards of one bucket; its manifest entry."""
    latent_shape = (packing.channels, *members[0].thw)
    info_b = BucketInfo(bucket, latent_shape, len(members), [], packing.bucket_field_shapes[bucket])
    probe = Manifest(
        packing.spec,
        packing.channels,
        packing.latent_dtype,
        packing.text_encoders,
        [],
        packing.fields,
        [info_b],
    )
    sample_bytes = sum(
        math.prod(probe.field_shape(info_b, name)) * np.dtype(f.dtype).itemsize
        for name, f in packing.fields.items()
    )
    for k, (a, z) in enumerate(plan_shards(len(members), sample_bytes, shard_mb * 1024 * 1024)):
        file = shard_file(bucket, k)
        info = writer.completed(file, z - a)
        if info is None:
            arrays = _load_shard(members[a:z], latent_shape, packing, packing.bucket_field_shapes[bucket])
            info = writer.write(file, bucket, arrays)
            log(f"wrote {file} ({info.samples} samples, {info.bytes / 2**20:.1f} MB)")
        else:
            log(f"kept {file} from an earlier run")
        info_b.shards.append(info)
    return info_b


# ---------------------------------------------------------------------------------------------------------
# Building one shard's arrays


def _empty_arrays(
    members: list[SourceSample],
    latent_shape: tuple[int, ...],
    packing: _Packing,
    field_shapes: dict[str, tuple[int, ...]],
) -> dict[str, np.ndarray]:
    """The shard's arrays with the scalars filled in and room for the rest (text zero-padded)."""
    n = len(members)
    arrays: dict[str, np.ndarray] = {LATENTS: np.empty((n, *latent_shape), dtype=packing.latent_dtype)}
    for enc, info in packing.text_encoders.items():
        arrays[TEXT_PREFIX + enc] = np.zeros((n, info.max_len, info.dim), dtype=TEXT_DTYPE)
        arrays[TEXT_LEN_PREFIX + enc] = np.empty(n, dtype=TEXT_LEN_DTYPE)
    arrays[FPS] = np.array([s.fps for s in members], dtype=SCALAR_FIELDS[FPS])
    arrays[DURATION] = np.array([s.duration for s in members], dtype=SCALAR_FIELDS[DURATION])
    arrays[CAPTION_ID] = np.array([s.caption_id for s in members], dtype=SCALAR_FIELDS[CAPTION_ID])
    for name, info in packing.fields.items():
        if name not in arrays and not name.startswith((TEXT_PREFIX, TEXT_LEN_PREFIX)):
            shape = info.per_sample_shape if info.per_sample_shape is not None else field_shapes[name]
            arrays[name] = np.empty((n, *shape), dtype=info.dtype)
    return arrays


def _fill_sample(
    arrays: dict[str, np.ndarray], i: int, s: SourceSample, latent_shape: tuple[int, ...], packing: _Packing
) -> None:
    """Load sample `s` into row `i`: latent cropped to the bucket, text padded; NaN/inf or an array that
    changed shape since probing is an error naming the sample and file."""
    where = f"sample {s.id} ({METADATA_NAME}:{s.line})"
    lat = load_array(s.latent, LATENT_TENSOR_NAMES)
    if lat.ndim == 3:
        lat = lat[:, None]
    if tuple(lat.shape) != tuple(s.latent_shape):
        raise DataError(f"{where}: latent changed shape while packing", file=s.latent)
    lat = _crop(lat, tuple(latent_shape[1:]))
    with np.errstate(over="ignore", invalid="ignore"):
        arrays[LATENTS][i] = lat
    if not np.isfinite(arrays[LATENTS][i]).all():
        raise DataError(
            f"{where}: latent holds NaN or inf (or overflows {packing.latent_dtype})", file=s.latent
        )
    for enc in packing.text_encoders:
        emb = load_array(s.text[enc], ("text", enc))
        dst = arrays[TEXT_PREFIX + enc]
        with np.errstate(over="ignore", invalid="ignore"):
            dst[i, : len(emb)] = emb
        if not np.isfinite(dst[i]).all():
            raise DataError(f"{where}: text.{enc} holds NaN or inf (or overflows float16)", file=s.text[enc])
        arrays[TEXT_LEN_PREFIX + enc][i] = len(emb)
    for name, p in s.fields.items():
        a = load_array(p, (name,))
        if name in packing.latent_like:
            if tuple(a.shape) != s.raw_latent_shape:
                raise DataError(f"{where}: field {name!r} changed shape while packing", file=p)
            a = _crop(a.reshape(s.latent_shape), tuple(latent_shape[1:]))
        if tuple(a.shape) != arrays[name].shape[1:]:
            raise DataError(f"{where}: field {name!r} changed shape while packing", file=p)
        arrays[name][i] = a


def _load_shard(
    members: list[SourceSample],
    latent_shape: tuple[int, ...],
    packing: _Packing,
    field_shapes: dict[str, tuple[int, ...]],
) -> dict[str, np.ndarray]:
    arrays = _empty_arrays(members, latent_shape, packing, field_shapes)
    for i, s in enumerate(members):
        _fill_sample(arrays, i, s, latent_shape, packing)
    return arrays
