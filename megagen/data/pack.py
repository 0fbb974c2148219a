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
from typing import Any

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
from megagen.data.shard_format import NUMPY_TO_SAFETENSORS, SAFETENSORS_DTYPES, shard_file
from megagen.data.shard_writer import DatasetWriter, plan_shards

METADATA_NAME = "metadata.jsonl"
_LATENT_TENSOR_NAMES = ("latents", "latent")


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


# ---------------------------------------------------------------------------------------------------------
# Reading source arrays


def _bf16_to_f32(u16: np.ndarray) -> np.ndarray:
    return (u16.astype(np.uint32) << 16).view(np.float32)


def _pick_tensor(path: str, names: list[str], preferred: tuple[str, ...]) -> str:
    if len(names) == 1:
        return names[0]
    for n in preferred:
        if n in names:
            return n
    raise DataError(
        f"holds tensors {names}; expected exactly one or one named {' / '.join(preferred)}", file=path
    )


def probe_array(path: str, preferred: tuple[str, ...] = ()) -> tuple[tuple[int, ...], str]:
    """(shape, dtype name) of a source array without reading its data. DataError naming the file."""
    if path.endswith(".npy"):
        try:
            a = np.load(path, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise DataError("file is missing", file=path) from None
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read .npy: {exc}", file=path) from None
        return tuple(a.shape), a.dtype.name
    if path.endswith(".safetensors"):
        if not os.path.exists(path):
            raise DataError("file is missing", file=path)
        header = _raw_safetensors_header(path)
        name = _pick_tensor(path, list(header), preferred)
        code = header[name]["dtype"]
        return tuple(header[name]["shape"]), "bfloat16" if code == "BF16" else _st_dtype(code, path)
    raise DataError("unsupported array file type (use .npy or .safetensors)", file=path)


def _st_dtype(code: str, path: str) -> str:
    if code not in SAFETENSORS_DTYPES:
        raise DataError(f"unsupported safetensors dtype {code}", file=path)
    return SAFETENSORS_DTYPES[code]


def _raw_safetensors_header(path: str) -> dict[str, Any]:
    # The source may hold BF16, which the shard parser (numpy dtypes only) rejects; read the header plainly.
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > 100 * 1024 * 1024:
            raise DataError("not a safetensors file", file=path)
        try:
            header = json.loads(f.read(n))
        except ValueError as exc:
            raise DataError(f"bad safetensors header: {exc}", file=path) from None
    header.pop("__metadata__", None)
    return header


def load_array(path: str, preferred: tuple[str, ...] = ()) -> np.ndarray:
    """A source array as numpy (bfloat16 widened to float32). DataError naming the file."""
    if path.endswith(".npy"):
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read .npy: {exc}", file=path) from None
    header = _raw_safetensors_header(path)
    name = _pick_tensor(path, list(header), preferred)
    entry = header[name]
    begin, end = entry["data_offsets"]
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n + begin)
        raw = f.read(end - begin)
    if len(raw) != end - begin:
        raise DataError("truncated safetensors file", file=path)
    if entry["dtype"] == "BF16":
        return _bf16_to_f32(np.frombuffer(raw, dtype="<u2")).reshape(entry["shape"])
    dtype = np.dtype(_st_dtype(entry["dtype"], path)).newbyteorder("<")
    return np.frombuffer(raw, dtype=dtype).reshape(entry["shape"]).copy()


# ---------------------------------------------------------------------------------------------------------
# The source listing


@dataclass
class _Source:
    line: int
    id: str
    latent: str
    text: dict[str, str]
    fps: float
    duration: float
    caption_id: int
    fields: dict[str, str]
    latent_shape: tuple[int, ...] = ()
    raw_latent_shape: tuple[int, ...] = ()
    text_lens: dict[str, int] = field(default_factory=dict)
    extra_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    thw: tuple[int, int, int] = (0, 0, 0)
    bucket: str = ""


def _number(rec: dict, key: str, default: float, where: str, integer: bool = False):
    v = rec.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise DataError(f"{where}: {key!r} must be {'an integer' if integer else 'a number'}, got {v!r}")
    if not math.isfinite(v):
        raise DataError(f"{where}: {key!r} is not finite")
    return v


def read_metadata(src: str) -> list[_Source]:
    path = os.path.join(src, METADATA_NAME)
    if not os.path.exists(path):
        raise DataError(f"no {METADATA_NAME} (one JSON object per sample)", file=path)
    out: list[_Source] = []
    ids: set[str] = set()

    def resolve(p: Any, where: str, what: str) -> str:
        if not isinstance(p, str) or not p:
            raise DataError(f"{where}: {what} must be a path string, got {p!r}")
        return p if os.path.isabs(p) else os.path.join(src, p)

    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except ValueError as exc:
                raise DataError(f"{where}: not valid JSON ({exc})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{where}: not a JSON object")
            sid = rec.get("id")
            if not isinstance(sid, (str, int)) or isinstance(sid, bool) or str(sid) == "":
                raise DataError(f"{where}: 'id' must be a non-empty string or integer")
            sid = str(sid)
            where = f"{where} (sample {sid})"
            if sid in ids:
                raise DataError(f"{where}: id is repeated")
            ids.add(sid)
            text = rec.get("text")
            if not isinstance(text, dict) or not text:
                raise DataError(f"{where}: 'text' must map each text encoder to an embedding file")
            extra = rec.get("fields") or {}
            if not isinstance(extra, dict):
                raise DataError(f"{where}: 'fields' must be an object")
            for name in extra:
                if (
                    name == LATENTS
                    or name in SCALAR_FIELDS
                    or name.startswith((TEXT_PREFIX, TEXT_LEN_PREFIX))
                ):
                    raise DataError(f"{where}: extra field {name!r} collides with a standard field")
            out.append(
                _Source(
                    line=lineno,
                    id=sid,
                    latent=resolve(rec.get("latent"), where, "'latent'"),
                    text={str(k): resolve(v, where, f"text.{k}") for k, v in text.items()},
                    fps=float(_number(rec, "fps", 0.0, where)),
                    duration=float(_number(rec, "duration", 0.0, where)),
                    caption_id=int(_number(rec, "caption_id", -1, where, integer=True)),
                    fields={str(k): resolve(v, where, f"fields.{k}") for k, v in extra.items()},
                )
            )
    if not out:
        raise DataError("lists no samples", file=path)
    return out


def parse_max_len(text: str | int | dict | None) -> int | dict[str, int] | None:
    """`256` (every encoder) or `ul2=256,byt5=128` → int or dict; None/'' → None."""
    if text is None or text == "" or isinstance(text, (int, dict)):
        return text or None
    text = str(text).strip()
    if "=" not in text:
        return int(text)
    out = {}
    for part in text.split(","):
        k, _, v = part.partition("=")
        out[k.strip()] = int(v)
    return out


# ---------------------------------------------------------------------------------------------------------
# Packing


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

    # Probe every array's shape (headers only) and check that the dataset is consistent.
    encoders = list(sources[0].text)
    channels: int | None = None
    text_dims: dict[str, int] = {}
    extra_names = sorted(sources[0].fields)
    extra_dtypes: dict[str, str] = {}
    latent_rank: int | None = None
    for s in sources:
        where = f"sample {s.id} ({METADATA_NAME}:{s.line})"
        if list(s.text) != encoders:
            raise DataError(
                f"{where}: text encoders {list(s.text)} differ from the first sample's {encoders}"
            )
        if sorted(s.fields) != extra_names:
            raise DataError(
                f"{where}: extra fields {sorted(s.fields)} differ from the first sample's {extra_names}"
            )
        shape, dtype = probe_array(s.latent, _LATENT_TENSOR_NAMES)
        s.raw_latent_shape = tuple(shape)
        if len(shape) == 3:
            shape = (shape[0], 1, *shape[1:])
        if len(shape) not in (2, 4) or min(shape) < 1 or not dtype.startswith(("float", "bfloat")):
            raise DataError(
                f"{where}: latent is {list(shape)} {dtype}; "
                "expected a float (C, T, H, W), (C, H, W) or (C, T)",
                file=s.latent,
            )
        latent_rank = len(shape) if latent_rank is None else latent_rank
        if len(shape) != latent_rank:
            raise DataError(
                f"{where}: latent is {list(shape)} but earlier samples are {latent_rank}-D: a dataset holds "
                "either 1-D (C, T) or video/image latents",
                file=s.latent,
            )
        channels = shape[0] if channels is None else channels
        if shape[0] != channels:
            raise DataError(
                f"{where}: latent has {shape[0]} channels, earlier samples {channels}", file=s.latent
            )
        s.latent_shape = shape
        for enc, p in s.text.items():
            tshape, tdtype = probe_array(p, ("text", enc))
            if len(tshape) != 2 or tshape[1] < 1 or not tdtype.startswith(("float", "bfloat")):
                raise DataError(
                    f"{where}: text.{enc} is {list(tshape)} {tdtype}; expected float (L, D)", file=p
                )
            text_dims.setdefault(enc, tshape[1])
            if tshape[1] != text_dims[enc]:
                raise DataError(
                    f"{where}: text.{enc} has dim {tshape[1]}, earlier samples {text_dims[enc]}", file=p
                )
            s.text_lens[enc] = tshape[0]
        for name, p in s.fields.items():
            fshape, fdtype = probe_array(p, (name,))
            fdtype = "float32" if fdtype == "bfloat16" else fdtype
            if fdtype not in NUMPY_TO_SAFETENSORS:
                raise DataError(f"{where}: field {name!r} has unsupported dtype {fdtype}", file=p)
            if extra_dtypes.setdefault(name, fdtype) != fdtype:
                raise DataError(
                    f"{where}: field {name!r} is {fdtype}, earlier samples {extra_dtypes[name]}", file=p
                )
            s.extra_shapes[name] = tuple(fshape)

    text_encoders: dict[str, TextEncoderInfo] = {}
    for enc in encoders:
        longest = max(s.text_lens[enc] for s in sources)
        limit = max_len_arg.get(enc, longest) if isinstance(max_len_arg, dict) else (max_len_arg or longest)
        if limit < 1:
            raise ValueError(f"max length of {enc} must be positive")
        for s in sources:
            if s.text_lens[enc] > limit:
                raise DataError(
                    f"sample {s.id} ({METADATA_NAME}:{s.line}): text.{enc} has {s.text_lens[enc]} tokens, "
                    f"more than the max length {limit}",
                    file=s.text[enc],
                )
        text_encoders[enc] = TextEncoderInfo(dim=text_dims[enc], max_len=limit)

    # Extra fields shaped exactly like their sample's latent are bucketed (and cropped) with it.
    latent_like = {
        name for name in extra_names if all(s.extra_shapes[name] == s.raw_latent_shape for s in sources)
    }
    if rules is not None and any(len(r) != latent_rank - 1 for r in rules):
        form = "t<T>" if latent_rank == 2 else "t<T>_h<H>_w<W>"
        raise ValueError(f"the latents are {latent_rank}-D: bucket rules must be {form}")

    # Buckets.
    dropped: list[str] = []
    kept: list[_Source] = []
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
            s.extra_shapes[name] = (int(channels), *thw)
        kept.append(s)
    if not kept:
        raise DataError("no sample fits the bucket rules", file=os.path.join(src, METADATA_NAME))
    by_bucket: dict[str, list[_Source]] = {}
    for s in sorted(kept, key=lambda s: (s.thw, s.line)):  # buckets by (T, H, W), samples in file order
        by_bucket.setdefault(s.bucket, []).append(s)

    fields = standard_fields(latent_dtype, text_encoders)
    bucket_field_shapes: dict[str, dict[str, tuple[int, ...]]] = {b: {} for b in by_bucket}
    for name in extra_names:
        dtype = extra_dtypes[name]
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
    writer = DatasetWriter(out, "pack:" + digest.hexdigest(), overwrite=overwrite)

    bucket_infos: list[BucketInfo] = []
    for b, members in by_bucket.items():
        latent_shape = (int(channels), *members[0].thw)
        info_b = BucketInfo(b, latent_shape, len(members), [], bucket_field_shapes[b])
        probe = Manifest(spec, int(channels), latent_dtype, text_encoders, [], fields, [info_b])
        sample_bytes = sum(
            math.prod(probe.field_shape(info_b, name)) * np.dtype(f.dtype).itemsize
            for name, f in fields.items()
        )
        for k, (a, z) in enumerate(plan_shards(len(members), sample_bytes, shard_mb * 1024 * 1024)):
            file = shard_file(b, k)
            info = writer.completed(file, z - a)
            if info is None:
                arrays = _load_shard(
                    members[a:z],
                    latent_shape,
                    latent_dtype,
                    text_encoders,
                    fields,
                    bucket_field_shapes[b],
                    latent_like,
                )
                info = writer.write(file, b, arrays)
                log(f"wrote {file} ({info.samples} samples, {info.bytes / 2**20:.1f} MB)")
            else:
                log(f"kept {file} from an earlier run")
            info_b.shards.append(info)
        bucket_infos.append(info_b)

    manifest = Manifest(
        spec=spec,
        latent_channels=int(channels),
        latent_dtype=latent_dtype,
        text_encoders=text_encoders,
        fps_values=sorted({s.fps for s in kept}),
        fields=fields,
        buckets=bucket_infos,
    )
    writer.finish(manifest)
    return PackResult(manifest, out, writer.written, writer.reused, dropped)


def _load_shard(
    members: list[_Source],
    latent_shape: tuple[int, ...],
    latent_dtype: str,
    text_encoders: dict[str, TextEncoderInfo],
    fields: dict[str, FieldInfo],
    field_shapes: dict[str, tuple[int, ...]],
    latent_like: set[str] = frozenset(),
) -> dict[str, np.ndarray]:
    n = len(members)
    arrays: dict[str, np.ndarray] = {LATENTS: np.empty((n, *latent_shape), dtype=latent_dtype)}
    for enc, info in text_encoders.items():
        arrays[TEXT_PREFIX + enc] = np.zeros((n, info.max_len, info.dim), dtype=TEXT_DTYPE)
        arrays[TEXT_LEN_PREFIX + enc] = np.empty(n, dtype=TEXT_LEN_DTYPE)
    arrays[FPS] = np.array([s.fps for s in members], dtype=SCALAR_FIELDS[FPS])
    arrays[DURATION] = np.array([s.duration for s in members], dtype=SCALAR_FIELDS[DURATION])
    arrays[CAPTION_ID] = np.array([s.caption_id for s in members], dtype=SCALAR_FIELDS[CAPTION_ID])
    for name, info in fields.items():
        if name not in arrays and not name.startswith((TEXT_PREFIX, TEXT_LEN_PREFIX)):
            shape = info.per_sample_shape if info.per_sample_shape is not None else field_shapes[name]
            arrays[name] = np.empty((n, *shape), dtype=info.dtype)
    for i, s in enumerate(members):
        where = f"sample {s.id} ({METADATA_NAME}:{s.line})"
        lat = load_array(s.latent, _LATENT_TENSOR_NAMES)
        if lat.ndim == 3:
            lat = lat[:, None]
        if tuple(lat.shape) != tuple(s.latent_shape):
            raise DataError(f"{where}: latent changed shape while packing", file=s.latent)
        lat = _crop(lat, tuple(latent_shape[1:]))
        with np.errstate(over="ignore", invalid="ignore"):
            arrays[LATENTS][i] = lat
        if not np.isfinite(arrays[LATENTS][i]).all():
            raise DataError(f"{where}: latent holds NaN or inf (or overflows {latent_dtype})", file=s.latent)
        for enc in text_encoders:
            emb = load_array(s.text[enc], ("text", enc))
            dst = arrays[TEXT_PREFIX + enc]
            with np.errstate(over="ignore", invalid="ignore"):
                dst[i, : len(emb)] = emb
            if not np.isfinite(dst[i]).all():
                raise DataError(
                    f"{where}: text.{enc} holds NaN or inf (or overflows float16)", file=s.text[enc]
                )
            arrays[TEXT_LEN_PREFIX + enc][i] = len(emb)
        for name, p in s.fields.items():
            a = load_array(p, (name,))
            if name in latent_like:
                if tuple(a.shape) != s.raw_latent_shape:
                    raise DataError(f"{where}: field {name!r} changed shape while packing", file=p)
                a = _crop(a.reshape(s.latent_shape), tuple(latent_shape[1:]))
            if tuple(a.shape) != arrays[name].shape[1:]:
                raise DataError(f"{where}: field {name!r} changed shape while packing", file=p)
            arrays[name][i] = a
    return arrays
