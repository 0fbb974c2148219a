"""Reading a dataset: `ShardReader`, random access to samples through one memory map per shard.

The reader parses shard headers itself (megagen/data/shard_format.py) and maps each file with
`numpy.memmap`, so reading a sample is a zero-copy view and a batch is one copy. Problems are raised as
`DataError` naming file and sample, or as `SampleSkipped` with `on_error="skip"`. See docs/data-format.md.
"""

from __future__ import annotations

import bisect
import itertools
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from megagen.data import host_batch
from megagen.data.finite_check import COPY_CHUNK, copy_finite, nonfinite_rows
from megagen.data.format import LATENTS, DataError, SampleSkipped, first_problem
from megagen.data.manifest import BucketInfo, ShardInfo, field_ranges, load_manifest
from megagen.data.shard_format import ShardHeader, header_problems, parse_header, sha256_file


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

    def nonfinite_error(self, bucket: str, ids: Sequence[int]) -> DataError | None:
        """The DataError (file, bucket, sample: the message an eager check raises) of the first of samples
        `ids` of `bucket` whose latents hold NaN or inf; None when all are finite. Scans the memory map
        directly, whatever `check_finite` and `on_error` say."""
        for i in ids:
            shard, local = self._locate(bucket, int(i))
            try:
                latents = self._shard_views(bucket, shard)[LATENTS]
                if nonfinite_rows(latents[local : local + 1])[0]:
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
            if self.check_finite and nonfinite_rows(sample[LATENTS][None])[0]:
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
    _CHUNK = COPY_CHUNK
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
                    bad += [rows[j] for j in np.flatnonzero(nonfinite_rows(block))]
                continue
            for row, local in zip(rows, locals_):
                if checked:
                    if copy_finite(dst[row, ...], src[local, ...], self._CHUNK):
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

    def to_host_batch(self, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        """Arrays from `read_batch` (or one `read` sample) → the host batch (stored dtypes, text masks):
        megagen/data/host_batch.py."""
        return host_batch.to_host_batch(self.manifest, arrays)

    def to_model_batch(self, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        """Arrays from `read_batch` (or one `read` sample) → the training batch of megagen/data/contract.py
        on the host (`to_host_batch`, then `cast_to_compute`). The loaders cast on the device instead."""
        return host_batch.to_model_batch(self.manifest, arrays)
