"""Shard files: the safetensors layout, the atomic/resumable dataset writer and the memory-mapped reader.

A shard is one standard safetensors file (8-byte little-endian header length, JSON header, raw data)
whose tensors are the per-sample fields stacked over the shard's samples (`latents` [n, C, T, H, W],
`text.<enc>` [n, L, D], ...). The reader parses the header itself and maps the file with `numpy.memmap`, so
reading a sample is a zero-copy view. See docs/data-format.md.
"""

from __future__ import annotations

import bisect
import glob
import hashlib
import itertools
import json
import math
import os
import struct
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from megagen.data.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    LATENTS,
    MANIFEST_NAME,
    NUMPY_TO_SAFETENSORS,
    PROGRESS_NAME,
    SAFETENSORS_DTYPES,
    SHARD_SUFFIX,
    TEXT_LEN_PREFIX,
    TEXT_PREFIX,
    BucketInfo,
    DataError,
    Manifest,
    SampleSkipped,
    ShardInfo,
    field_ranges,
    fsync_dir,
    load_manifest,
    write_json_atomic,
    write_manifest,
)

MAX_HEADER_BYTES = 100 * 1024 * 1024
_HASH_CHUNK = 8 * 1024 * 1024


# ---------------------------------------------------------------------------------------------------------
# The safetensors layout


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


def parse_header(path: str) -> ShardHeader:
    """Read and check the safetensors header of `path` (reads only the header). DataError naming the file."""
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
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise DataError("__metadata__ is not an object", file=path)
    data_start = 8 + n
    tensors: dict[str, TensorEntry] = {}
    spans = []
    for name, entry in header.items():
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
        tensors[name] = TensorEntry(dtype, shape, data_start + begin, data_start + end)
        spans.append((begin, end, name))
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            raise DataError(f"tensor {name!r}: data is not contiguous with the previous tensor", file=path)
        pos = end
    return ShardHeader(
        path, data_start, data_start + pos, tensors, {str(k): str(v) for k, v in metadata.items()}
    )


def _le(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return a


def write_shard(path: str, arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> tuple[int, str]:
    """Write one safetensors shard atomically (`path.tmp`, fsync, rename). Returns (bytes, sha256 hex).

    Tensors are laid out by decreasing item size, then name, so each is aligned to its item size.
    """
    arrays = {k: _le(v) for k, v in arrays.items()}
    for k, v in arrays.items():
        if v.dtype.name not in NUMPY_TO_SAFETENSORS:
            raise ValueError(f"{path}: field {k!r} has dtype {v.dtype}, which the format does not allow")
    order = sorted(arrays, key=lambda k: (-arrays[k].dtype.itemsize, k))
    header: dict[str, Any] = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}}
    pos = 0
    for k in order:
        a = arrays[k]
        header[k] = {
            "dtype": NUMPY_TO_SAFETENSORS[a.dtype.name],
            "shape": list(a.shape),
            "data_offsets": [pos, pos + a.nbytes],
        }
        pos += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)
    digest = hashlib.sha256()
    tmp = path + ".tmp"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(tmp, "wb") as f:
        for chunk in (struct.pack("<Q", len(raw)), raw):
            f.write(chunk)
            digest.update(chunk)
        for k in order:
            buf = arrays[k].reshape(-1).view(np.uint8)
            f.write(buf.data)
            digest.update(buf.data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")
    return 8 + len(raw) + pos, digest.hexdigest()


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def shard_metadata(bucket: str, samples: int) -> dict[str, str]:
    return {"format": FORMAT_NAME, "version": str(FORMAT_VERSION), "bucket": bucket, "samples": str(samples)}


def header_problems(
    header: ShardHeader, manifest: Manifest, bucket: BucketInfo, shard: ShardInfo
) -> list[str]:
    """Disagreements between a shard's header and what the manifest says it holds (empty when fine)."""
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


# ---------------------------------------------------------------------------------------------------------
# Writing a dataset


def plan_shards(samples: int, sample_bytes: int, target_bytes: float) -> list[tuple[int, int]]:
    """Split `samples` into as few shards as keep each near `target_bytes` (even sizes; never one per sample
    unless a single sample exceeds the target). Returns [(start, stop), ...]."""
    if samples <= 0:
        return []
    k = max(1, min(samples, math.ceil(samples * sample_bytes / max(target_bytes, 1.0))))
    out, start = [], 0
    for i in range(k):
        stop = start + samples // k + (i < samples % k)
        out.append((start, stop))
        start = stop
    return out


def shard_file(bucket: str, index: int) -> str:
    return f"{bucket}/shard-{index:05d}{SHARD_SUFFIX}"


class DatasetWriter:
    """Writes one dataset's shards into `out_dir`, resuming an interrupted run of the same plan.

    `plan_key` identifies the inputs and options (a hash); a progress file (`.pack-progress.json`) records
    every finished shard with its size and sha256. A rerun with the same key reuses a shard whose file is
    present with the recorded size and checksum; anything else is (re)written. The manifest is removed at
    the start and written last, so a dataset directory with a manifest is always complete.

    `out_dir` must be missing, empty, or hold this same job (same key: resume or rerun); a directory holding
    a different dataset or job is replaced only with `overwrite=True`, and anything else is refused.
    """

    def __init__(self, out_dir: str | os.PathLike, plan_key: str, overwrite: bool = False):
        self.out_dir = os.fspath(out_dir)
        self.plan_key = plan_key
        self.progress_path = os.path.join(self.out_dir, PROGRESS_NAME)
        self.written: list[str] = []
        self.reused: list[str] = []
        if os.path.exists(self.out_dir) and not os.path.isdir(self.out_dir):
            raise DataError("output path exists and is not a directory", file=self.out_dir)
        os.makedirs(self.out_dir, exist_ok=True)
        ours = any(os.path.exists(os.path.join(self.out_dir, n)) for n in (MANIFEST_NAME, PROGRESS_NAME))
        if os.listdir(self.out_dir) and not ours:
            raise DataError(
                "output directory is not empty and holds no megagen dataset; refusing to write into it",
                file=self.out_dir,
            )
        self.done: dict[str, dict[str, Any]] = {}
        same_job = False
        if os.path.exists(self.progress_path):
            try:
                with open(self.progress_path, encoding="utf-8") as f:
                    progress = json.load(f)
                same_job = progress.get("plan") == plan_key
                if same_job:
                    self.done = dict(progress.get("shards", {}))
            except (OSError, ValueError, AttributeError):
                self.done = {}
        if ours and not same_job and not overwrite:
            raise DataError(
                "output directory holds a different dataset (written by another pack/synth job or with other "
                "options); pass --overwrite to replace it",
                file=self.out_dir,
            )
        for tmp in glob.glob(os.path.join(self.out_dir, "*", "*.tmp")):
            os.remove(tmp)
        manifest = os.path.join(self.out_dir, MANIFEST_NAME)
        self._save_progress()
        if os.path.exists(manifest):
            os.remove(manifest)

    def _save_progress(self) -> None:
        write_json_atomic(self.progress_path, {"plan": self.plan_key, "shards": self.done})

    def completed(self, file: str, samples: int) -> ShardInfo | None:
        """The recorded ShardInfo when shard `file` is already finished and intact, else None."""
        rec = self.done.get(file)
        if not rec or rec.get("samples") != samples:
            return None
        path = os.path.join(self.out_dir, file)
        try:
            if os.path.getsize(path) != rec["bytes"] or sha256_file(path) != rec["sha256"]:
                return None
        except OSError:
            return None
        self.reused.append(file)
        return ShardInfo(file, samples, rec["bytes"], rec["sha256"])

    def write(self, file: str, bucket: str, arrays: dict[str, np.ndarray]) -> ShardInfo:
        n = len(next(iter(arrays.values())))
        size, sha = write_shard(os.path.join(self.out_dir, file), arrays, shard_metadata(bucket, n))
        self.done[file] = {"samples": n, "bytes": size, "sha256": sha}
        self._save_progress()
        self.written.append(file)
        return ShardInfo(file, n, size, sha)

    def finish(self, manifest: Manifest) -> str:
        """Remove shard files of earlier plans, then write the manifest (atomically, last)."""
        keep = {s.file for b in manifest.buckets for s in b.shards}
        for path in glob.glob(os.path.join(self.out_dir, "*", "shard-*" + SHARD_SUFFIX)):
            rel = os.path.relpath(path, self.out_dir).replace(os.sep, "/")
            if rel not in keep:
                os.remove(path)
        for d in os.listdir(self.out_dir):
            full = os.path.join(self.out_dir, d)
            if os.path.isdir(full) and not os.listdir(full):
                os.rmdir(full)
        self.done = {k: v for k, v in self.done.items() if k in keep}
        self._save_progress()
        return write_manifest(self.out_dir, manifest)


# ---------------------------------------------------------------------------------------------------------
# Reading a dataset


@dataclass
class _Shard:
    path: str
    info: ShardInfo
    first: int
    """Index (within the bucket) of the shard's first sample."""
    header: ShardHeader | None
    """Parsed at open (verify != "none") or lazily on first use."""


class ShardReader:
    """Random access to the samples of a latent-shard dataset, one memory map per shard file.

    on_error: "fail" — any bad data raises `DataError` naming the file (and sample);
              "skip" — a sample that cannot be used *at read time* raises `SampleSkipped` (a DataError
              subclass) instead, which loaders catch, log and count; problems found at open still fail.
    verify:   "size" (default) — at open, every shard must exist with the manifest's byte size and a header
              matching the manifest (field names, dtypes, per-bucket shapes); only headers are read;
              "checksum" — additionally sha256 every shard (reads everything);
              "none" — touch no shard at open; the same checks run lazily when a shard is first read.
    check_finite: reads reject samples whose latents hold NaN or inf (eager: a scan fused with every copy,
              ~30% of the read cost of large latents). With False nothing is checked on read;
              `nonfinite_error` scans given samples on demand (training's `data.check_finite=on_nan_loss`
              calls it when a step's loss is not finite).

    Picklable: the pickled state is paths, byte offsets and the manifest; memory maps are reopened lazily in
    each process (DALI / DataLoader workers).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        on_error: str = "fail",
        verify: str = "size",
        check_finite: bool = True,
    ):
        if on_error not in ("fail", "skip"):
            raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
        if verify not in ("size", "checksum", "none"):
            raise ValueError(f"verify must be 'size', 'checksum' or 'none', got {verify!r}")
        self.path = os.fspath(path)
        self.on_error, self.verify, self.check_finite = on_error, verify, check_finite
        self.manifest = load_manifest(self.path)
        self.ranges = field_ranges(self.manifest)
        """Bounded per-sample fields (`text_len.E`): every read checks them, whatever `check_finite` says."""
        self.buckets: dict[str, BucketInfo] = {b.name: b for b in self.manifest.buckets}
        self._starts: dict[str, list[int]] = {
            b.name: [0, *itertools.accumulate(s.samples for s in b.shards)][:-1]
            for b in self.manifest.buckets
        }
        """Per bucket: the index of each shard's first sample (what a sample id is located by)."""
        self._opened: dict[tuple[str, int], _Shard] = {}
        """(bucket, shard index) → its `_Shard`, made when first used: nothing per shard at open."""
        self._views: dict[str, dict[str, np.ndarray]] = {}
        self._out_of_range: dict[str, dict[int, str]] = {}
        """Per mapped shard: local row → why its bounded fields are out of range (usually empty)."""
        if verify != "none":
            self._verify_all()

    # -- pickling: paths + offsets only --------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_views"], state["_out_of_range"] = {}, {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def close(self) -> None:
        """Drop this process's memory maps (they reopen on the next read)."""
        self._views, self._out_of_range = {}, {}

    # -- open-time checks ------------------------------------------------------------------------------------
    def _shard_problems(self, bucket: BucketInfo, shard: _Shard) -> list[DataError]:
        try:
            size = os.path.getsize(shard.path)
        except FileNotFoundError:
            return [DataError("shard file is missing", file=shard.path)]
        except OSError as exc:
            return [DataError(f"cannot stat: {exc.strerror or exc}", file=shard.path)]
        if size != shard.info.bytes:
            kind = "truncated" if size < shard.info.bytes else "too long"
            return [
                DataError(f"{kind}: {size} bytes, the manifest records {shard.info.bytes}", file=shard.path)
            ]
        try:
            header = parse_header(shard.path)
        except DataError as exc:
            return [exc]
        problems = header_problems(header, self.manifest, bucket, shard.info)
        if problems:
            return [DataError(p, file=shard.path) for p in problems]
        shard.header = header
        return []

    def _verify_all(self) -> None:
        problems = self.shard_problems(self.verify)
        if problems:
            raise first_problem(problems, len(problems), self.path)

    def shard_problems(self, mode: str, rank: int = 0, world: int = 1) -> list[DataError]:
        """The problems `verify=mode` finds in this rank's share of the shards: every `world`-th shard of
        the dataset's list from the `rank`-th ("size": stat and header; "checksum": also the sha256 of
        each, when stat and headers are fine). The headers read stay parsed for later reads."""
        if mode not in ("size", "checksum"):
            raise ValueError(f"mode must be 'size' or 'checksum', got {mode!r}")
        mine, offset = [], 0  # flat shard index k = offset of its bucket + index within it
        for b in self.manifest.buckets:
            first = offset + (rank - offset) % world  # its first shard k ≡ rank (mod world)
            mine += [
                (b, self._shard(b.name, k - offset)) for k in range(first, offset + len(b.shards), world)
            ]
            offset += len(b.shards)
        problems: list[DataError] = []
        for b, s in mine:
            problems += self._shard_problems(b, s)
        if not problems and mode == "checksum":
            shards = [s for _, s in mine]
            with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
                for s, digest in zip(shards, pool.map(lambda s: sha256_file(s.path), shards)):
                    if digest != s.info.sha256:
                        problems.append(
                            DataError(
                                f"checksum mismatch: sha256 {digest}, the manifest records {s.info.sha256}",
                                file=s.path,
                            )
                        )
        return problems

    # -- lookups ---------------------------------------------------------------------------------------------
    def num_samples(self, bucket: str) -> int:
        return self._bucket(bucket).samples

    def sample_shapes(self, bucket: str) -> dict[str, tuple[int, ...]]:
        """Per-sample shape of every field in `bucket`."""
        b = self._bucket(bucket)
        return {name: self.manifest.field_shape(b, name) for name in self.manifest.fields}

    def _bucket(self, bucket: str) -> BucketInfo:
        try:
            return self.buckets[bucket]
        except KeyError:
            raise KeyError(f"{self.path}: no bucket {bucket!r}; buckets: {', '.join(self.buckets)}") from None

    def _locate(self, bucket: str, sample_id: int) -> tuple[_Shard, int]:
        b = self._bucket(bucket)
        if not 0 <= sample_id < b.samples:
            raise IndexError(
                f"{self.path}: sample {sample_id} is out of range for bucket {bucket} ({b.samples})"
            )
        shard = self._shard(bucket, bisect.bisect_right(self._starts[bucket], sample_id) - 1)
        return shard, sample_id - shard.first

    def _shard(self, bucket: str, index: int) -> _Shard:
        shard = self._opened.get((bucket, index))
        if shard is None:
            info = self.buckets[bucket].shards[index]
            path = os.path.join(self.path, *info.file.split("/"))
            shard = self._opened.setdefault(
                (bucket, index), _Shard(path, info, self._starts[bucket][index], None)
            )
        return shard

    def _shard_views(self, bucket: str, shard: _Shard) -> dict[str, np.ndarray]:
        views = self._views.get(shard.path)
        if views is not None:
            return views
        if (
            shard.header is None
            or not os.path.exists(shard.path)
            or os.path.getsize(shard.path) != shard.info.bytes
        ):
            problems = self._shard_problems(self.buckets[bucket], shard)
            if problems:
                raise problems[0]
        try:
            mm = np.memmap(shard.path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot map: {exc}", file=shard.path) from None
        views = {}
        for name in self.manifest.fields:
            t = shard.header.tensors[name]
            view = mm[t.start : t.end].view(np.dtype(t.dtype).newbyteorder("<")).reshape(t.shape)
            views[name] = np.asarray(view)  # a plain ndarray over the map: cheaper to index than np.memmap
        self._out_of_range[shard.path] = self._range_problems(views)
        self._views[shard.path] = views
        return views

    def _range_problems(self, views: dict[str, np.ndarray]) -> dict[int, str]:
        """Local row → reason for the rows of a shard whose bounded fields (`ranges`) are out of range: one
        vectorised pass over each bounded column when the shard is mapped, so that a read of a sample costs
        one lookup in a (usually empty) dict instead of per-batch array operations."""
        problems: dict[int, str] = {}
        for r in self.ranges:
            values = views[r.field]
            for j in np.flatnonzero(r.outside(values)):
                problems.setdefault(int(j), r.message(values[j]))
        return problems

    def _error(self, exc: DataError, bucket: str, sample: int) -> DataError:
        cls = SampleSkipped if self.on_error == "skip" else DataError
        return cls(exc.reason, file=exc.file, sample=sample, bucket=bucket)

    def _nonfinite(self, latents: np.ndarray) -> np.ndarray:
        """Per-sample bool: does latents[i] hold NaN or inf? (latents stacked on dim 0)."""
        return _has_nonfinite(np.ascontiguousarray(latents).reshape(len(latents), -1), axis=1)

    def nonfinite_error(self, bucket: str, ids: Sequence[int]) -> DataError | None:
        """The DataError (file, bucket, sample: the message an eager check raises) of the first of samples
        `ids` of `bucket` whose latents hold NaN or inf; None when all are finite. Scans the memory map
        directly, whatever `check_finite` and `on_error` say."""
        for i in ids:
            shard, local = self._locate(bucket, int(i))
            try:
                latents = self._shard_views(bucket, shard)[LATENTS]
                if self._nonfinite(latents[local : local + 1])[0]:
                    raise DataError("latents hold NaN or inf", file=shard.path)
            except DataError as exc:
                return DataError(exc.reason, file=exc.file, sample=int(i), bucket=bucket)
        return None

    # -- reads -----------------------------------------------------------------------------------------------
    def read(self, bucket: str, sample_id: int) -> dict[str, np.ndarray]:
        """One sample: field name → array without the leading n dim (read-only views of the memory map).

        Raises DataError (on_error="fail") or SampleSkipped (on_error="skip") naming the file and sample.
        """
        shard, local = self._locate(bucket, sample_id)
        try:
            views = self._shard_views(bucket, shard)
            sample = {name: v[local, ...] for name, v in views.items()}  # 0-d arrays for scalars
            out_of_range = self._out_of_range[shard.path].get(local)
            if out_of_range is not None:
                raise DataError(out_of_range, file=shard.path)
            if self.check_finite and self._nonfinite(sample[LATENTS][None])[0]:
                raise DataError("latents hold NaN or inf", file=shard.path)
        except DataError as exc:
            raise self._error(exc, bucket, sample_id) from None
        except OSError as exc:
            raise self._error(DataError(f"read failed: {exc}", file=shard.path), bucket, sample_id) from None
        return sample

    def read_into(
        self, bucket: str, ids: Sequence[int], out: dict[str, np.ndarray]
    ) -> list[tuple[int, SampleSkipped]]:
        """Copy samples `ids` of `bucket` into rows 0.. of the preallocated arrays `out` (field → array of
        shape (len(ids), *per-sample shape), the stored dtype; fields missing from `out` are not read): the
        one copy out of the memory map. With `check_finite` the latents are checked while they are copied
        (per chunk, cache-hot: a bit test on float16/float32). The bounded fields (`ranges`) are checked on
        every read (found when the shard is mapped), whether or not `out` asks for them.

        Returns (row, SampleSkipped) for every unusable sample with on_error="skip" (its row is left as it
        was: the caller decides what goes there); with on_error="fail" the first problem raises DataError.
        """
        skipped: list[tuple[int, SampleSkipped]] = []
        groups: dict[str, tuple[_Shard, list[int], list[int]]] = {}  # shard → (rows, local indices)
        for row, i in enumerate(ids):
            shard, local = self._locate(bucket, int(i))
            entry = groups.setdefault(shard.path, (shard, [], []))
            entry[1].append(row)
            entry[2].append(local)
        for shard, rows, locals_ in groups.values():
            try:
                views = self._shard_views(bucket, shard)
                known = self._out_of_range[shard.path]  # found when mapped; usually empty: one test
                bad = [(r, known[i]) for r, i in zip(rows, locals_) if i in known] if known else []
                nonfinite = self._copy_rows(views, rows, locals_, out)
                bad += [(row, "latents hold NaN or inf") for row in nonfinite]
                problems = [(row, DataError(reason, file=shard.path)) for row, reason in bad]
            except DataError as exc:
                problems = [(row, exc) for row in rows]
            except OSError as exc:
                problems = [(row, DataError(f"read failed: {exc}", file=shard.path)) for row in rows]
            seen: set[int] = set()
            for row, reason in sorted(problems, key=lambda x: x[0]):  # a sample's first problem, in row order
                if row in seen:
                    continue
                seen.add(row)
                err = self._error(reason, bucket, int(ids[row]))
                if not isinstance(err, SampleSkipped):
                    raise err from None
                skipped.append((row, err))
        skipped.sort(key=lambda x: x[0])
        return skipped

    _SMALL_SAMPLE = 256 << 10
    """Samples up to this many bytes per field are gathered with one `np.take` per field and shard."""
    _CHUNK = 256 << 10
    """Elements per chunk of the fused copy + finite check of large latents."""

    def _copy_rows(
        self, views: dict[str, np.ndarray], rows: list[int], locals_: list[int], out: dict[str, np.ndarray]
    ) -> list[int]:
        """Copy rows `locals_` of a shard's `views` into rows `rows` of `out`; the rows whose latents are not
        finite (when `check_finite`)."""
        contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
        bad: list[int] = []
        for name, dst in out.items():
            src = views[name]
            checked = self.check_finite and name == LATENTS
            if src[0].nbytes <= self._SMALL_SAMPLE:
                if contiguous:
                    np.take(src, locals_, axis=0, out=dst[rows[0] : rows[0] + len(rows)])
                else:
                    dst[rows] = src[locals_]
                if checked:
                    block = dst[rows]
                    bad += [rows[j] for j in np.flatnonzero(self._nonfinite(block))]
                continue
            for row, local in zip(rows, locals_):
                if checked:
                    if _copy_finite(dst[row, ...], src[local, ...], self._CHUNK):
                        continue
                    bad.append(row)
                else:
                    np.copyto(dst[row, ...], src[local, ...])
        return bad

    def read_batch(
        self, bucket: str, ids: Sequence[int], skipped: list[SampleSkipped] | None = None
    ) -> dict[str, np.ndarray]:
        """Samples `ids` of `bucket` stacked on a new dim 0 (fresh, writable arrays in the stored dtypes: one
        copy out of the memory map, see `read_into`).

        With on_error="skip" and a `skipped` list, unusable samples are left out of the batch and their
        SampleSkipped errors appended to `skipped` (the batch may then be shorter, even empty); without the
        list the first SampleSkipped propagates. With on_error="fail" the first problem raises DataError.
        """
        shapes = self.sample_shapes(bucket)
        out = {
            name: np.empty((len(ids), *shape), dtype=np.dtype(self.manifest.fields[name].dtype))
            for name, shape in shapes.items()
        }
        bad = self.read_into(bucket, ids, out) if len(ids) else []
        if bad:
            if skipped is None:
                raise bad[0][1]
            skipped += [err for _, err in bad]
            good = np.ones(len(ids), dtype=bool)
            good[[row for row, _ in bad]] = False
            out = {name: a[good] for name, a in out.items()}
        return out

    def host_batch_specs(self, bucket: str) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
        """(key, numpy dtype, per-sample shape) of every field of the host batch of `bucket`."""
        shapes, fields = self.sample_shapes(bucket), self.manifest.fields
        specs = [(LATENTS, np.dtype(fields[LATENTS].dtype), shapes[LATENTS])]
        for enc in self.manifest.text_encoders:
            name = TEXT_PREFIX + enc
            specs.append((name, np.dtype(fields[name].dtype), shapes[name]))
            specs.append(("text_valid." + enc, np.dtype(bool), shapes[name][:1]))
        for name, shape in shapes.items():
            if name == LATENTS or name.startswith(TEXT_LEN_PREFIX) or name.startswith(TEXT_PREFIX):
                continue
            specs.append((name, np.dtype(fields[name].dtype), shape))
        return specs

    def to_host_batch(self, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        """Arrays from `read_batch` (or one `read` sample) → the host batch: torch tensors over the same
        memory in the *stored* dtypes (`latents`, `text.<enc>` float16 as stored), `text_valid.<enc>` bool
        from `text_len.<enc>` (dropped); see megagen/data/contract.py. `cast_to_compute` makes it the model
        batch (the loaders do that on the device, after the host-to-device copy)."""
        import torch

        latent_rank = len(self.manifest.buckets[0].latent_shape) if self.manifest.buckets else 4
        if arrays[LATENTS].ndim == latent_rank:  # a single sample: add the batch dim
            arrays = {k: np.asarray(v)[None] for k, v in arrays.items()}

        def tensor(a: np.ndarray) -> torch.Tensor:
            a = np.asarray(a)
            if not a.flags.writeable or not a.flags.c_contiguous:  # a read-only view of the map
                a = np.array(a, order="C")
            return torch.from_numpy(a)

        out: dict[str, Any] = {LATENTS: tensor(arrays[LATENTS])}
        for enc in self.manifest.text_encoders:
            text = arrays[TEXT_PREFIX + enc]
            lengths = np.asarray(arrays[TEXT_LEN_PREFIX + enc])
            out[TEXT_PREFIX + enc] = tensor(text)
            out["text_valid." + enc] = torch.from_numpy(np.arange(text.shape[1])[None, :] < lengths[:, None])
        for name, a in arrays.items():
            if name == LATENTS or name.startswith(TEXT_LEN_PREFIX) or name.startswith(TEXT_PREFIX):
                continue
            out[name] = tensor(a)
        return out

    def to_model_batch(self, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        """Arrays from `read_batch` (or one `read` sample) → the training batch of megagen/data/contract.py on
        the host: `to_host_batch`, then `cast_to_compute` (`latents`, `text.<enc>` float32, `text_valid.<enc>`
        bool, `fps`, `duration` float32, `caption_id` int64; extra fields as tensors, floating ones float32).
        The loaders instead move the host batch to the device first and cast there."""
        from megagen.data.contract import cast_to_compute

        return cast_to_compute(self.to_host_batch(arrays))


def first_problem(problems: list[DataError], total: int, dataset: str) -> DataError:
    """One DataError for a start-up check that found `total` problems: the first, with the count of the
    others and where they are all listed."""
    first = problems[0]
    if total <= 1:
        return first
    more = f" (and {total - 1} more problem(s); `megagen data check {dataset}` lists all)"
    return DataError(first.reason + more, file=first.file, sample=first.sample, bucket=first.bucket)


_FINITE_BOUNDS = {
    np.dtype(np.float16): (np.int16, np.uint16, 0x7C00, 0xFC00),
    np.dtype(np.float32): (np.int32, np.uint32, 0x7F800000, 0xFF800000),
}
"""float dtype → (signed view, unsigned view, smallest positive and negative non-finite bit patterns).

A value is NaN or inf ⇔ its exponent bits are all ones: as the signed integer view the positive ones are
the largest values (≥ 0x7C00 for float16), as the unsigned view the negative ones are (≥ 0xFC00). So two
read-only max reductions, no temporary array, find any non-finite value."""


def _has_nonfinite(a: np.ndarray, axis: int | None = None):
    """Does `a` (float, C-contiguous) hold NaN or inf? (per row of a 2-d `a` with `axis=1`)"""
    bounds = _FINITE_BOUNDS.get(a.dtype)
    if bounds is None:
        return ~np.isfinite(a).all(axis=axis)
    signed, unsigned, pos, neg = bounds
    return (a.view(signed).max(axis=axis) >= pos) | (a.view(unsigned).max(axis=axis) >= neg)


def _copy_finite(dst: np.ndarray, src: np.ndarray, chunk: int = ShardReader._CHUNK) -> bool:
    """Copy `src` into `dst` (same shape and dtype, `dst` C-contiguous) chunk by chunk, checking each chunk
    for NaN/inf while it is in cache (`_has_nonfinite`); True when every value is finite."""
    d, s = dst.reshape(-1), src.reshape(-1)
    finite = True
    for lo in range(0, len(d), chunk):
        part = d[lo : lo + chunk]
        np.copyto(part, s[lo : lo + chunk])
        if finite and _has_nonfinite(part):
            finite = False
    return finite


__all__ = [
    "DatasetWriter",
    "ShardHeader",
    "ShardReader",
    "TensorEntry",
    "first_problem",
    "header_problems",
    "parse_header",
    "plan_shards",
    "sha256_file",
    "shard_file",
    "shard_metadata",
    "write_shard",
]
