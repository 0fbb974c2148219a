"""The on-disk shard: a standard safetensors file, its dtype codes, its naming and its header checks.

A shard is one safetensors file (8-byte little-endian header length, JSON header, raw data) whose tensors
are the per-sample fields stacked over the shard's samples (`latents` [n, C, T, H, W], `text.<enc>`
[n, L, D], ...). Reader, writer and `megagen data check` all go through this module, so the byte layout is
stated once. See docs/data-format.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from megagen.data.format import FORMAT_NAME, FORMAT_VERSION, LATENTS, SHARD_SUFFIX, DataError

if TYPE_CHECKING:
    from megagen.data.manifest import BucketInfo, Manifest, ShardInfo

MAX_HEADER_BYTES = 100 * 1024 * 1024
HASH_CHUNK = 8 * 1024 * 1024

# safetensors dtype codes ↔ numpy dtype names. bfloat16 is left out on purpose: numpy cannot read it,
# and the format promises that numpy alone reads every shard.
SAFETENSORS_DTYPES = {
    "F16": "float16",
    "F32": "float32",
    "F64": "float64",
    "I8": "int8",
    "I16": "int16",
    "I32": "int32",
    "I64": "int64",
    "U8": "uint8",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "BOOL": "bool",
}
NUMPY_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    """numpy dtype name (little-endian)."""
    shape: tuple[int, ...]
    start: int
    """Absolute byte offset of the tensor's data in the file."""
    end: int


@dataclass(frozen=True)
class ShardHeader:
    path: str
    data_start: int
    """8 + header length: where the data section begins."""
    size: int
    """The file size the header implies (data_start + end of the last tensor)."""
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]


def shard_file(bucket: str, index: int) -> str:
    """The manifest's relative path of shard `index` of `bucket`."""
    return f"{bucket}/shard-{index:05d}{SHARD_SUFFIX}"


def shard_metadata(bucket: str, samples: int) -> dict[str, str]:
    """The `__metadata__` every shard header carries (checked against the manifest on open)."""
    return {"format": FORMAT_NAME, "version": str(FORMAT_VERSION), "bucket": bucket, "samples": str(samples)}


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _read_header_json(path: str) -> tuple[dict, int]:
    """The decoded JSON header of `path` and its byte length (reads only the header)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise DataError("file is shorter than the 8-byte safetensors header length", file=path)
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise DataError(f"header length {n} is implausible: not a safetensors file", file=path)
            raw = f.read(n)
    except FileNotFoundError:
        raise DataError("shard file is missing", file=path) from None
    except OSError as exc:
        raise DataError(f"cannot read: {exc.strerror or exc}", file=path) from None
    if len(raw) < n:
        raise DataError(f"truncated: the file ends inside its {n}-byte header", file=path)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"header is not valid JSON: {exc}", file=path) from None
    if not isinstance(header, dict):
        raise DataError("header is not a JSON object", file=path)
    return header, n


def _tensor_entry(path: str, name: str, entry, data_start: int) -> TensorEntry:
    try:
        code, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        shape = tuple(int(x) for x in shape)
        begin, end = int(begin), int(end)
    except (TypeError, KeyError, ValueError):
        raise DataError(f"tensor {name!r}: malformed header entry {entry!r}", file=path) from None
    if code not in SAFETENSORS_DTYPES:
        raise DataError(f"tensor {name!r}: unsupported dtype {code!r}", file=path)
    dtype = SAFETENSORS_DTYPES[code]
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    if begin < 0 or end - begin != nbytes:
        raise DataError(
            f"tensor {name!r}: data_offsets {[begin, end]} do not hold {list(shape)} {dtype}", file=path
        )
    return TensorEntry(dtype, shape, data_start + begin, data_start + end)


def parse_header(path: str) -> ShardHeader:
    """Read and check the safetensors header of `path` (reads only the header). DataError naming the file."""
    header, n = _read_header_json(path)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise DataError("__metadata__ is not an object", file=path)
    data_start = 8 + n
    tensors = {name: _tensor_entry(path, name, entry, data_start) for name, entry in header.items()}
    pos = 0
    for name, t in sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end, kv[0])):
        if t.start - data_start != pos:
            raise DataError(f"tensor {name!r}: data is not contiguous with the previous tensor", file=path)
        pos = t.end - data_start
    return ShardHeader(
        path, data_start, data_start + pos, tensors, {str(k): str(v) for k, v in metadata.items()}
    )


def _metadata_problems(header: ShardHeader, bucket: BucketInfo, shard: ShardInfo) -> list[str]:
    problems = []
    meta = header.metadata
    if meta.get("format") != FORMAT_NAME or meta.get("version") != str(FORMAT_VERSION):
        problems.append(
            f"header metadata says format {meta.get('format')!r} version {meta.get('version')!r}, "
            f"expected {FORMAT_NAME!r} version {FORMAT_VERSION}"
        )
    if meta.get("bucket", bucket.name) != bucket.name:
        problems.append(
            f"header says bucket {meta.get('bucket')!r} but the manifest lists it in {bucket.name!r}"
        )
    if header.size != shard.bytes:
        problems.append(f"header describes {header.size} bytes but the manifest records {shard.bytes}")
    return problems


def header_problems(
    header: ShardHeader, manifest: Manifest, bucket: BucketInfo, shard: ShardInfo
) -> list[str]:
    """Disagreements between a shard's header and what the manifest says it holds (empty when fine)."""
    problems = _metadata_problems(header, bucket, shard)
    n = shard.samples
    for name, info in manifest.fields.items():
        t = header.tensors.get(name)
        if t is None:
            problems.append(f"field {name!r} is missing")
            continue
        shape = (n, *manifest.field_shape(bucket, name))
        if t.dtype != info.dtype:
            problems.append(f"field {name!r} is {t.dtype}, the manifest says {info.dtype}")
        if t.shape != shape:
            if t.shape[:1] == (n,) and name == LATENTS:
                what = f"samples 0-{n - 1} have latent shape {list(t.shape[1:])}"
                problems.append(f"{what}, but bucket {bucket.name} has shape {list(shape[1:])}")
            else:
                problems.append(f"field {name!r} has shape {list(t.shape)}, expected {list(shape)}")
    for name in header.tensors:
        if name not in manifest.fields:
            problems.append(f"tensor {name!r} is not listed in the manifest's fields")
    return problems
