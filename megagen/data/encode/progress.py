"""What an encode job has finished: one done-list per rank, read by every rank, so a rerun skips it.

`OUT/.encode-done/rank-NNNNN.jsonl` gets one line per finished shard (its manifest entry and the inputs in
it) and one per bad input, appended after the shard file is complete; a line cut off by a crash is
ignored, and so is a shard whose file is gone or has another size — its inputs are encoded again. Every
rank reads every list (any earlier world size), and rank 0 builds the one manifest from them at the end.
`OUT/.encode-job.json` holds the job's options key: a directory holding another job or dataset is refused
unless overwritten.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from dataclasses import dataclass, field

from megagen.data.format import MANIFEST_NAME, PROGRESS_NAME, SHARD_SUFFIX, DataError
from megagen.data.manifest import ShardInfo, write_json_atomic

JOB_NAME = ".encode-job.json"
DONE_DIR = ".encode-done"


@dataclass
class ShardRecord:
    info: ShardInfo
    bucket: str
    latent_shape: tuple[int, ...]
    inputs: list[str]
    fps: list[float]


@dataclass
class Progress:
    shards: list[ShardRecord] = field(default_factory=list)
    bad: dict[str, str] = field(default_factory=dict)
    """input key → reason."""

    def finished(self) -> set[str]:
        return {k for s in self.shards for k in s.inputs} | set(self.bad)


def done_list_path(out: str, rank: int) -> str:
    return os.path.join(out, DONE_DIR, f"rank-{rank:05d}.jsonl")


def prepare_output(out: str, plan_key: str, overwrite: bool) -> None:
    """Rank 0, before any rank writes: OUT is empty, new, or this same job (resumed); the manifest goes
    (it is written last). Another job or dataset in OUT is replaced only with `overwrite`."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise DataError("output path exists and is not a directory", file=out)
    os.makedirs(out, exist_ok=True)
    job_file = os.path.join(out, JOB_NAME)
    same_job = False
    if os.path.exists(job_file):
        try:
            with open(job_file, encoding="utf-8") as f:
                same_job = json.load(f).get("plan") == plan_key
        except (OSError, ValueError, AttributeError):
            same_job = False
    if os.listdir(out) and not same_job:
        ours = any(os.path.exists(os.path.join(out, n)) for n in (MANIFEST_NAME, PROGRESS_NAME, JOB_NAME))
        if not ours:
            raise DataError("output directory is not empty and holds no megagen dataset", file=out)
        if not overwrite:
            raise DataError(
                "output directory holds another dataset or encode job; pass --overwrite", file=out
            )
        _clear_dataset(out)
    write_json_atomic(job_file, {"plan": plan_key})
    os.makedirs(os.path.join(out, DONE_DIR), exist_ok=True)
    if os.path.exists(os.path.join(out, MANIFEST_NAME)):
        os.remove(os.path.join(out, MANIFEST_NAME))


def _clear_dataset(out: str) -> None:
    for name in (MANIFEST_NAME, PROGRESS_NAME, JOB_NAME):
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    shutil.rmtree(os.path.join(out, DONE_DIR), ignore_errors=True)
    remove_unlisted_shards(out, keep=set())


def remove_unlisted_shards(out: str, keep: set[str]) -> None:
    """Delete shard files (and emptied bucket folders) that no finished record lists."""
    for path in glob.glob(os.path.join(out, "*", "shard-*" + SHARD_SUFFIX + "*")):
        if os.path.relpath(path, out).replace(os.sep, "/") not in keep:
            os.remove(path)
    for d in os.listdir(out):
        full = os.path.join(out, d)
        if os.path.isdir(full) and not d.startswith(".") and not os.listdir(full):
            os.rmdir(full)


def read_progress(out: str, rank: int | None = None) -> Progress:
    """Every rank's finished shards and bad inputs (or only `rank`'s), intact shards only."""
    pattern = "rank-*.jsonl" if rank is None else os.path.basename(done_list_path(out, rank))
    progress = Progress()
    for path in sorted(glob.glob(os.path.join(out, DONE_DIR, pattern))):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    _add_record(progress, json.loads(line), out)
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut off by a crash: its inputs are simply not done
    return progress


def _add_record(progress: Progress, rec: dict, out: str) -> None:
    if "bad" in rec:
        progress.bad[rec["bad"]] = rec["reason"]
        return
    s = rec["shard"]
    info = ShardInfo(s["file"], s["samples"], s["bytes"], s["sha256"])
    try:
        intact = os.path.getsize(os.path.join(out, info.file)) == info.bytes
    except OSError:
        intact = False
    if intact:
        shape = tuple(s["latent_shape"])
        progress.shards.append(ShardRecord(info, s["bucket"], shape, list(rec["inputs"]), list(rec["fps"])))


def shards_written(out: str, rank: int) -> int:
    """How many shard lines `rank`'s done-list holds (intact or not): its next shard's index."""
    try:
        with open(done_list_path(out, rank), encoding="utf-8") as f:
            return sum('"shard"' in line for line in f)
    except FileNotFoundError:
        return 0


class DoneList:
    """Appends this rank's finished records, each flushed and fsynced before the next input."""

    def __init__(self, out: str, rank: int):
        self.path = done_list_path(out, rank)

    def _append(self, rec: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def shard(self, record: ShardRecord) -> None:
        i = record.info
        shard = {"file": i.file, "samples": i.samples, "bytes": i.bytes, "sha256": i.sha256}
        shard |= {"bucket": record.bucket, "latent_shape": list(record.latent_shape)}
        self._append({"shard": shard, "inputs": record.inputs, "fps": record.fps})

    def bad(self, key: str, reason: str) -> None:
        self._append({"bad": key, "reason": reason})
