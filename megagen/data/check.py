"""`megagen data check` and `megagen data stats`: verify a shard dataset completely; summarise it.

`check_dataset` reports every problem it finds (it does not stop at the first): the manifest, every
shard's presence, size, checksum and header (fields, dtypes, per-bucket shapes), and every sample's
latents (NaN/inf), text embeddings (NaN/inf) and text lengths.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from megagen.data.format import LATENTS, TEXT_PREFIX, DataError, tokens_per_sample
from megagen.data.manifest import BucketInfo, Manifest, ShardInfo, field_ranges, load_manifest, manifest_path
from megagen.data.shard_format import header_problems, parse_header, sha256_file

_SCAN_BYTES = 64 * 1024 * 1024
"""Samples are scanned in chunks of about this many bytes of latents."""


@dataclass(frozen=True)
class Problem:
    """One problem: the file it is in, the sample (index within `bucket`) when it concerns one, and what."""

    file: str
    message: str
    sample: int | None = None
    bucket: str | None = None

    def __str__(self) -> str:
        where = self.file
        if self.sample is not None:
            where += f": sample {self.sample} of bucket {self.bucket}"
        return f"{where}: {self.message}"


def _shard_problems(
    root: str, manifest: Manifest, bucket: BucketInfo, shard: ShardInfo, first: int
) -> list[Problem]:
    path = os.path.join(root, *shard.file.split("/"))
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        return [Problem(path, "shard file is missing")]
    except OSError as exc:
        return [Problem(path, f"cannot stat: {exc.strerror or exc}")]
    out: list[Problem] = []
    if size != shard.bytes:
        kind = "truncated" if size < shard.bytes else "too long"
        out.append(Problem(path, f"{kind}: {size} bytes, the manifest records {shard.bytes}"))
    try:
        header = parse_header(path)
    except DataError as exc:
        return out or [Problem(path, exc.reason)]  # a header cut short by truncation is not news
    problems = header_problems(header, manifest, bucket, shard)
    out += [Problem(path, p) for p in problems]
    if out:
        return out  # sizes or layout disagree: the sample data cannot be trusted to scan
    try:
        digest = sha256_file(path)
    except OSError as exc:
        return [Problem(path, f"read failed: {exc.strerror or exc}")]
    if digest != shard.sha256:
        out.append(Problem(path, f"checksum mismatch: sha256 {digest}, the manifest records {shard.sha256}"))
    out += _scan_samples(path, header, manifest, bucket, first)
    return out


def _scan_samples(path: str, header, manifest: Manifest, bucket: BucketInfo, first: int) -> list[Problem]:
    out: list[Problem] = []
    mm = np.memmap(path, dtype=np.uint8, mode="r")

    def view(name: str) -> np.ndarray:
        t = header.tensors[name]
        return mm[t.start : t.end].view(np.dtype(t.dtype).newbyteorder("<")).reshape(t.shape)

    def report(bad: np.ndarray, what: str, offset: int = 0) -> None:
        for j in np.flatnonzero(bad):
            local = offset + int(j)
            out.append(Problem(path, f"{what} (row {local} of this shard)", first + local, bucket.name))

    latents = view(LATENTS)
    n = len(latents)
    chunk = max(1, _SCAN_BYTES // max(1, latents[0].nbytes))
    for a in range(0, n, chunk):
        flat = np.asarray(latents[a : a + chunk]).reshape(min(chunk, n - a), -1)
        report(~np.isfinite(flat).all(axis=1), "latents hold NaN or inf", a)
    for enc in manifest.text_encoders:
        text = np.asarray(view(TEXT_PREFIX + enc)).reshape(n, -1)
        report(~np.isfinite(text).all(axis=1), f"text.{enc} holds NaN or inf")
    for r in field_ranges(manifest):  # the rule every read applies too
        values = np.asarray(view(r.field))
        for j in np.flatnonzero(r.outside(values)):
            out.append(
                Problem(path, f"{r.message(values[j])} (row {j} of this shard)", first + int(j), bucket.name)
            )
    return out


def check_dataset(directory: str | os.PathLike, threads: int | None = None) -> list[Problem]:
    """Every problem of the dataset at `directory` (empty when it is sound). Reads every byte."""
    root = os.fspath(directory)
    try:
        manifest = load_manifest(root)
    except DataError as exc:
        return [Problem(exc.file or manifest_path(root), exc.reason)]
    jobs = []
    for b in manifest.buckets:
        first = 0
        for s in b.shards:
            jobs.append((b, s, first))
            first += s.samples
    workers = threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda job: _shard_problems(root, manifest, *job), jobs)
        return [p for r in results for p in r]


@dataclass
class BucketStats:
    name: str
    latent_shape: tuple[int, ...]
    samples: int
    shards: int
    bytes: int
    tokens_per_sample: int

    @property
    def tokens(self) -> int:
        return self.samples * self.tokens_per_sample


@dataclass
class DatasetStats:
    path: str
    spec: str
    latent_dtype: str
    text_encoders: dict[str, tuple[int, int]]
    """encoder → (dim, max_len)."""
    patch: tuple[int, ...]
    buckets: list[BucketStats] = field(default_factory=list)

    @property
    def samples(self) -> int:
        return sum(b.samples for b in self.buckets)

    @property
    def tokens(self) -> int:
        return sum(b.tokens for b in self.buckets)

    @property
    def bytes(self) -> int:
        return sum(b.bytes for b in self.buckets)

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "spec": self.spec,
            "latent_dtype": self.latent_dtype,
            "text_encoders": {k: {"dim": d, "max_len": n} for k, (d, n) in self.text_encoders.items()},
            "patch": list(self.patch),
            "samples": self.samples,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "buckets": [
                {
                    "name": b.name,
                    "latent_shape": list(b.latent_shape),
                    "samples": b.samples,
                    "shards": b.shards,
                    "bytes": b.bytes,
                    "tokens_per_sample": b.tokens_per_sample,
                    "tokens": b.tokens,
                }
                for b in self.buckets
            ],
        }

    def format(self) -> str:
        head = f"{'bucket':<16} {'latent (C,T,H,W)':<18} {'samples':>9} {'shards':>6} {'tokens/sample':>13} "
        head += f"{'tokens':>14} {'MB':>10}"
        lines = [
            f"{self.path}: spec {self.spec}, latents {self.latent_dtype}, text "
            + ", ".join(f"{k} {d}x{n}" for k, (d, n) in self.text_encoders.items())
            + f", patch {'x'.join(map(str, self.patch))}",
            head,
        ]
        for b in self.buckets:
            lines.append(
                f"{b.name:<16} {'x'.join(map(str, b.latent_shape)):<18} {b.samples:>9} {b.shards:>6} "
                f"{b.tokens_per_sample:>13} {b.tokens:>14} {b.bytes / 2**20:>10.2f}"
            )
        lines.append(
            f"{'total':<16} {'':<18} {self.samples:>9} {sum(b.shards for b in self.buckets):>6} {'':>13} "
            f"{self.tokens:>14} {self.bytes / 2**20:>10.2f}"
        )
        return "\n".join(lines)


def dataset_stats(directory: str | os.PathLike, patch: tuple[int, ...] = (1, 2, 2)) -> DatasetStats:
    """Buckets, sample counts, tokens (T/pt · H/ph · W/pw per sample) and bytes, from the manifest alone."""
    root = os.fspath(directory)
    m = load_manifest(root)
    stats = DatasetStats(
        root,
        m.spec,
        m.latent_dtype,
        {k: (v.dim, v.max_len) for k, v in m.text_encoders.items()},
        tuple(patch),
    )
    for b in m.buckets:
        stats.buckets.append(
            BucketStats(
                b.name,
                tuple(b.latent_shape),
                b.samples,
                len(b.shards),
                b.bytes,
                tokens_per_sample(b.latent_shape, patch),
            )
        )
    return stats
