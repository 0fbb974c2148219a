"""Writing shards and datasets: the atomic shard writer and the resumable dataset writer.

Both writers (`megagen data pack`, `megagen data synth`) go through `DatasetWriter`, so the rules of
docs/data-format.md (atomic files, resumable progress, manifest last) hold for every dataset.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import struct
from typing import Any

import numpy as np

from megagen.data.format import MANIFEST_NAME, PROGRESS_NAME, SHARD_SUFFIX, DataError
from megagen.data.manifest import Manifest, ShardInfo, write_json_atomic, write_manifest
from megagen.data.shard_format import NUMPY_TO_SAFETENSORS, sha256_file, shard_metadata
from megagen.fsutil import fsync_dir


def _little_endian(a: np.ndarray) -> np.ndarray:
    """`a` as a C-contiguous little-endian array: the byte order every shard stores."""
    a = np.ascontiguousarray(a)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return a


def write_shard(path: str, arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> tuple[int, str]:
    """Write one safetensors shard atomically (`path.tmp`, fsync, rename). Returns (bytes, sha256 hex).

    Tensors are laid out by decreasing item size, then name, so each is aligned to its item size.
    """
    arrays = {k: _little_endian(v) for k, v in arrays.items()}
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
