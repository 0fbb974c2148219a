"""The shared ground of benchmarks/data_loaders.py: cases, result rows, the datasets and request streams,
the page cache, and the reader as training opens one."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np

from megagen.data.format import MANIFEST_NAME
from megagen.data.sampler import BucketPlan, BucketSampler, RequestPlan
from megagen.data.shard_reader import ShardReader
from megagen.data.synth import synth


@dataclass
class Case:
    name: str
    buckets: str | None
    """Bucket list for `synth` (None = the video_tiny preset's three buckets)."""
    samples: int
    micro: int


@dataclass
class Row:
    case: str
    cache: str
    method: str
    seconds: float
    samples: int
    nbytes: int
    note: str = ""

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds

    @property
    def mb_per_s(self) -> float:
        return self.nbytes / self.seconds / 1e6


# ------------------------------------------------------------------------------------------------ dataset
def ensure_dataset(root: str, case: Case) -> str:
    path = os.path.join(root, case.name)
    manifest = os.path.join(path, MANIFEST_NAME)
    if os.path.exists(manifest):
        with open(manifest) as f:
            if sum(b["samples"] for b in json.load(f)["buckets"]) == case.samples:
                return path
    t = time.perf_counter()
    synth(path, "video_tiny", samples=case.samples, buckets=case.buckets, seed=0)
    print(f"  wrote {path} in {time.perf_counter() - t:.1f}s")
    return path


def shard_files(reader: ShardReader) -> list[str]:
    return [os.path.join(reader.path, *s.file.split("/")) for b in reader.buckets.values() for s in b.shards]


def sample_bytes(reader: ShardReader) -> dict[str, int]:
    fields = reader.manifest.fields
    return {
        name: sum(math.prod(shape) * np.dtype(fields[k].dtype).itemsize for k, shape in shapes.items())
        for name, shapes in ((b, reader.sample_shapes(b)) for b in reader.buckets)
    }


def request_plan(reader: ShardReader, micro: int, seed: int = 0) -> RequestPlan:
    """One epoch's worth of steps of one rank (dp=1): global batch = micro-batch = `micro`."""
    plans = [BucketPlan(name, b.samples, micro, micro) for name, b in reader.buckets.items()]
    steps = sum(p.size // micro for p in plans)
    return RequestPlan(BucketSampler(plans, seed), steps, dp_rank=0, dp_size=1)


# ------------------------------------------------------------------------------------------------ page cache
def cached_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Cached:"):
                return int(line.split()[1]) * 1024
    return 0


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def can_drop_caches(files: list[str]) -> bool:
    """Warm the files, drop caches, and check that the page cache shrank by most of their size."""
    total = sum(os.path.getsize(p) for p in files)
    read_files(files)
    before = cached_bytes()
    if not drop_caches():
        return False
    return before - cached_bytes() >= 0.8 * total


# ------------------------------------------------------------------------------------------------ methods
def read_files(files: list[str]) -> int:
    buf = bytearray(16 << 20)
    view = memoryview(buf)
    total = 0
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total


CHECK_EAGER = False
"""`--check-finite eager`: readers scan every sample's latents for NaN/inf on read (`data.check_finite=eager`,
and always with `data.on_error=skip`); default as training reads with `data.on_error=fail`: no scan on read
(`data.check_finite=on_nan_loss`, the scan runs only when a step's loss is not finite)."""


def open_reader(path: str) -> ShardReader:
    """A reader as training opens one (see `CHECK_EAGER`)."""
    return ShardReader(path, check_finite=CHECK_EAGER)
