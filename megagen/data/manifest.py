"""`manifest.json`: the dataset's table of contents (fields, buckets, shards), its schema and its I/O.

The manifest is written last by every writer, so a directory holding one is a complete dataset; loading it
validates everything a reader relies on before a shard is touched. See docs/data-format.md.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from megagen.data.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    LATENT_DTYPES,
    LATENTS,
    MANIFEST_NAME,
    PROGRESS_NAME,
    SCALAR_FIELDS,
    TEXT_DTYPE,
    TEXT_LEN_DTYPE,
    TEXT_LEN_PREFIX,
    TEXT_PREFIX,
    DataError,
)
from megagen.data.shard_format import NUMPY_TO_SAFETENSORS
from megagen.fsutil import fsync_dir

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


@dataclass
class TextEncoderInfo:
    dim: int
    max_len: int


@dataclass
class FieldInfo:
    """A per-sample array field stored in every shard as [n, *per_sample_shape]."""

    dtype: str
    per_sample_shape: tuple[int, ...] | None
    """None when the shape depends on the bucket (`latents`, or an entry of `BucketInfo.field_shapes`)."""


@dataclass(slots=True)
class ShardInfo:
    file: str
    """Path relative to the dataset directory, '/'-separated."""
    samples: int
    bytes: int
    sha256: str


@dataclass
class BucketInfo:
    name: str
    latent_shape: tuple[int, ...]
    samples: int
    shards: list[ShardInfo]
    field_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """Per-sample shapes of bucket-dependent fields other than `latents` (spec-specific extras)."""

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)


@dataclass
class Manifest:
    spec: str
    latent_channels: int
    latent_dtype: str
    text_encoders: dict[str, TextEncoderInfo]
    fps_values: list[float]
    fields: dict[str, FieldInfo]
    buckets: list[BucketInfo]
    extra: dict[str, Any] = field(default_factory=dict)
    """Unknown top-level keys (spec-specific additions), kept as they are."""
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION

    def bucket(self, name: str) -> BucketInfo:
        for b in self.buckets:
            if b.name == name:
                return b
        raise KeyError(f"no bucket {name!r}; buckets: {', '.join(b.name for b in self.buckets)}")

    def field_shape(self, bucket: BucketInfo, name: str) -> tuple[int, ...]:
        """Per-sample shape of field `name` in `bucket`."""
        info = self.fields[name]
        if info.per_sample_shape is not None:
            return tuple(info.per_sample_shape)
        if name == LATENTS:
            return tuple(bucket.latent_shape)
        return tuple(bucket.field_shapes[name])

    @property
    def num_samples(self) -> int:
        return sum(b.samples for b in self.buckets)

    def to_dict(self) -> dict[str, Any]:
        def bucket_dict(b: BucketInfo) -> dict[str, Any]:
            d: dict[str, Any] = {"name": b.name, "latent_shape": list(b.latent_shape), "samples": b.samples}
            if b.field_shapes:
                d["field_shapes"] = {k: list(v) for k, v in b.field_shapes.items()}
            d["shards"] = [
                {"file": s.file, "samples": s.samples, "bytes": s.bytes, "sha256": s.sha256} for s in b.shards
            ]
            return d

        out: dict[str, Any] = {
            "format": self.format,
            "version": self.version,
            "spec": self.spec,
            "latent": {"channels": self.latent_channels, "dtype": self.latent_dtype},
            "text_encoders": {k: {"dim": v.dim, "max_len": v.max_len} for k, v in self.text_encoders.items()},
            "fps_values": list(self.fps_values),
            "fields": {
                k: {
                    "dtype": v.dtype,
                    "per_sample_shape": None if v.per_sample_shape is None else list(v.per_sample_shape),
                }
                for k, v in self.fields.items()
            },
            "buckets": [bucket_dict(b) for b in self.buckets],
        }
        for k, v in self.extra.items():
            out.setdefault(k, v)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = MANIFEST_NAME) -> Manifest:
        """Parse and validate a manifest; any problem raises DataError naming `source`."""
        return _parse_manifest(d, source)


def standard_fields(latent_dtype: str, text_encoders: dict[str, TextEncoderInfo]) -> dict[str, FieldInfo]:
    """The fields every dataset has: latents, text.<enc>, text_len.<enc>, fps, duration, caption_id."""
    fields = {LATENTS: FieldInfo(latent_dtype, None)}
    for enc, info in text_encoders.items():
        fields[TEXT_PREFIX + enc] = FieldInfo(TEXT_DTYPE, (info.max_len, info.dim))
    for enc in text_encoders:
        fields[TEXT_LEN_PREFIX + enc] = FieldInfo(TEXT_LEN_DTYPE, ())
    for name, dtype in SCALAR_FIELDS.items():
        fields[name] = FieldInfo(dtype, ())
    return fields


@dataclass(frozen=True)
class FieldRange:
    """A per-sample field whose values the layout bounds, inclusive (`text_len.E` in [0, max_len]).

    The one statement of the rule: `megagen data check` reports with it and every read applies it, so a sample
    the check flags is never trained on."""

    field: str
    low: int
    high: int

    def outside(self, values):
        """Bool (array) of `values` (a numpy array or scalar) outside [low, high]: two comparisons each."""
        return (values < self.low) | (values > self.high)

    def message(self, value) -> str:
        return f"{self.field} is {value}, outside [{self.low}, {self.high}]"


def field_ranges(manifest: Manifest) -> tuple[FieldRange, ...]:
    """The bounded per-sample fields of `manifest`'s layout: each encoder's text length within its max_len
    (a longer one would unmask padding, or index past the stored embedding)."""
    return tuple(
        FieldRange(TEXT_LEN_PREFIX + enc, 0, info.max_len) for enc, info in manifest.text_encoders.items()
    )


def _fail(source: str, msg: str):
    raise DataError(msg, file=source)


def _int(v: Any, what: str, source: str, minimum: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        _fail(source, f"{what} must be an integer >= {minimum}, got {v!r}")
    return v


def _shape(v: Any, what: str, source: str) -> tuple[int, ...]:
    if not isinstance(v, list):
        _fail(source, f"{what} must be a list of integers, got {v!r}")
    return tuple(_int(x, what, source, 1) for x in v)


def _check_rel_path(p: Any, source: str) -> str:
    if not isinstance(p, str) or not p or p.startswith("/") or "\\" in p or ".." in p.split("/"):
        _fail(source, f"shard file {p!r} must be a relative '/'-separated path inside the dataset")
    return p


_KEYS = ("spec", "latent", "text_encoders", "fps_values", "fields", "buckets")


def _check_top_level(d: Any, source: str) -> None:
    """Format, version and the required keys: what makes a JSON object a megagen manifest."""
    if not isinstance(d, dict):
        _fail(source, "manifest is not a JSON object")
    fmt = d.get("format")
    if fmt != FORMAT_NAME:
        _fail(source, f"format is {fmt!r}, expected {FORMAT_NAME!r}: not a megagen latent-shard dataset")
    version = d.get("version")
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION
        hint = " (written by a newer megagen)" if newer else ""
        _fail(source, f"format version {version!r}{hint}; this reader supports version {FORMAT_VERSION}")
    missing = [k for k in _KEYS if k not in d]
    if missing:
        _fail(source, f"missing key(s): {', '.join(missing)}")
    if not isinstance(d["spec"], str) or not d["spec"]:
        _fail(source, f"spec must be a non-empty string, got {d['spec']!r}")


def _parse_latent(latent: Any, source: str) -> tuple[int, str]:
    if not isinstance(latent, dict):
        _fail(source, "latent must be an object {channels, dtype}")
    channels = _int(latent.get("channels"), "latent.channels", source, 1)
    ldtype = latent.get("dtype")
    if ldtype not in LATENT_DTYPES:
        _fail(source, f"latent.dtype {ldtype!r} is not one of {', '.join(LATENT_DTYPES)}")
    return channels, ldtype


def _parse_encoders(d: Any, source: str) -> dict[str, TextEncoderInfo]:
    if not isinstance(d, dict):
        _fail(source, "text_encoders must be an object")
    encoders: dict[str, TextEncoderInfo] = {}
    for name, info in d.items():
        if not _NAME_RE.match(name) or not isinstance(info, dict):
            _fail(source, f"text encoder {name!r}: bad name or entry")
        encoders[name] = TextEncoderInfo(
            dim=_int(info.get("dim"), f"text_encoders.{name}.dim", source, 1),
            max_len=_int(info.get("max_len"), f"text_encoders.{name}.max_len", source, 1),
        )
    return encoders


def _parse_fps(fps_values: Any, source: str) -> list[float]:
    if not isinstance(fps_values, list) or not all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in fps_values
    ):
        _fail(source, "fps_values must be a list of numbers")
    return [float(x) for x in fps_values]


def _parse_fields(
    d: Any, ldtype: str, encoders: dict[str, TextEncoderInfo], source: str
) -> dict[str, FieldInfo]:
    """The listed fields, which must include the standard ones exactly as the format defines them."""
    if not isinstance(d, dict):
        _fail(source, "fields must be an object")
    fields: dict[str, FieldInfo] = {}
    for name, info in d.items():
        if not _NAME_RE.match(name) or not isinstance(info, dict):
            _fail(source, f"field {name!r}: bad name or entry")
        if info.get("dtype") not in NUMPY_TO_SAFETENSORS:
            _fail(
                source,
                f"field {name!r}: dtype {info.get('dtype')!r} is not one of {sorted(NUMPY_TO_SAFETENSORS)}",
            )
        shape = info.get("per_sample_shape")
        if shape is not None:
            if not isinstance(shape, list):
                _fail(source, f"field {name!r}: per_sample_shape must be a list or null")
            shape = tuple(_int(x, f"fields.{name}.per_sample_shape", source, 1) for x in shape)
        fields[name] = FieldInfo(info["dtype"], shape)
    for name, info in standard_fields(ldtype, encoders).items():
        if name not in fields:
            _fail(source, f"fields: the required field {name!r} is missing")
        if fields[name] != info:
            _fail(source, f"fields: {name!r} is {fields[name]} but the format requires {info}")
    return fields


def _parse_shards(entries: Any, bucket: str, seen_files: set[str], source: str) -> list[ShardInfo]:
    if not isinstance(entries, list):
        _fail(source, f"bucket {bucket}: shards must be a list")
    shards = []
    for s in entries:
        if not isinstance(s, dict):
            _fail(source, f"bucket {bucket}: a shard entry is not an object")
        file = _check_rel_path(s.get("file"), source)
        if file in seen_files:
            _fail(source, f"shard {file} is listed twice")
        seen_files.add(file)
        sha = s.get("sha256")
        if not isinstance(sha, str) or not _SHA256_RE.fullmatch(sha):
            _fail(source, f"shard {file}: sha256 must be 64 lowercase hex digits")
        shards.append(
            ShardInfo(
                file=file,
                samples=_int(s.get("samples"), f"shard {file}: samples", source, 1),
                bytes=_int(s.get("bytes"), f"shard {file}: bytes", source, 1),
                sha256=sha,
            )
        )
    return shards


def _parse_bucket(
    i: int, b: Any, channels: int, fields: dict[str, FieldInfo], seen: tuple[set, set], source: str
) -> BucketInfo:
    """buckets[i]; `seen` = (bucket names, shard files) so far, each of which must be unique."""
    seen_names, seen_files = seen
    if not isinstance(b, dict):
        _fail(source, f"buckets[{i}] is not an object")
    name = b.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in seen_names:
        _fail(source, f"buckets[{i}]: name {name!r} is missing, malformed or repeated")
    seen_names.add(name)
    latent_shape = _shape(b.get("latent_shape"), f"bucket {name}: latent_shape", source)
    if len(latent_shape) < 2 or latent_shape[0] != channels:
        _fail(source, f"bucket {name}: latent_shape {list(latent_shape)} must be [{channels}, ...]")
    samples = _int(b.get("samples"), f"bucket {name}: samples", source)
    field_shapes = {}
    for fname, fshape in (b.get("field_shapes") or {}).items():
        field_shapes[fname] = _shape(fshape, f"bucket {name}: field_shapes.{fname}", source)
    for fname, info in fields.items():
        if info.per_sample_shape is None and fname != LATENTS and fname not in field_shapes:
            _fail(
                source,
                f"bucket {name}: field_shapes has no entry for the bucket-dependent field {fname!r}",
            )
    shards = _parse_shards(b.get("shards"), name, seen_files, source)
    if sum(s.samples for s in shards) != samples:
        held = sum(s.samples for s in shards)
        _fail(source, f"bucket {name}: samples is {samples} but its shards hold {held}")
    return BucketInfo(name, latent_shape, samples, shards, field_shapes)


def _parse_manifest(d: Any, source: str) -> Manifest:
    _check_top_level(d, source)
    channels, ldtype = _parse_latent(d["latent"], source)
    encoders = _parse_encoders(d["text_encoders"], source)
    fps_values = _parse_fps(d["fps_values"], source)
    fields = _parse_fields(d["fields"], ldtype, encoders, source)
    if not isinstance(d["buckets"], list):
        _fail(source, "buckets must be a list")
    seen: tuple[set, set] = (set(), set())
    buckets = [_parse_bucket(i, b, channels, fields, seen, source) for i, b in enumerate(d["buckets"])]
    known = {"format", "version", *_KEYS}
    return Manifest(
        spec=d["spec"],
        latent_channels=channels,
        latent_dtype=ldtype,
        text_encoders=encoders,
        fps_values=fps_values,
        fields=fields,
        buckets=buckets,
        extra={k: v for k, v in d.items() if k not in known},
    )


def manifest_path(directory: str | os.PathLike) -> str:
    return os.path.join(os.fspath(directory), MANIFEST_NAME)


def load_manifest(directory: str | os.PathLike) -> Manifest:
    """Read and validate `<directory>/manifest.json`; DataError naming the file on any problem."""
    path = manifest_path(directory)
    if not os.path.isdir(directory):
        raise DataError("dataset directory does not exist", file=os.fspath(directory))
    if not os.path.exists(path):
        hint = (
            " (an unfinished `megagen data pack`? rerun it to resume)"
            if os.path.exists(os.path.join(os.fspath(directory), PROGRESS_NAME))
            else ""
        )
        raise DataError(f"no manifest: not a megagen latent-shard dataset{hint}", file=path)
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read the manifest: {exc}", file=path) from None
    return _parse_manifest(d, path)


def write_json_atomic(path: str, obj: Any) -> None:
    """Write JSON to `path` via `path.tmp` + fsync + rename (+ directory fsync)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def write_manifest(directory: str | os.PathLike, manifest: Manifest) -> str:
    """Atomically write the manifest (the last step of any writer: its presence marks a complete dataset)."""
    path = manifest_path(directory)
    write_json_atomic(path, manifest.to_dict())
    return path
