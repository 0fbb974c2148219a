"""The checkpoint directory on disk: names, the completion marker, `latest`, validation, errors.

    <checkpoint.dir>/
      latest                         "step-000008": the newest complete checkpoint (replaced atomically)
      step-000004/                   one complete checkpoint
        .metadata  __<rank>_0.distcp DCP: tensors (model, optimizer state, EMA), sharded by the saving ranks
        megagen.json                 rank 0: step, spec, preset, mesh, sampler, schedule, config, and the
                                     manifest: every file's size and checksum
        rng/rank-00000.json          each rank's RNG state
        COMPLETE                     written last, with the checksum of megagen.json; a directory without
                                     it is never loaded
      step-000008.tmp-<nonce>/       a save in progress (or one interrupted by a crash): ignored, and
                                     deleted when the next run starts

Every rank writes its shards into the `.tmp-<nonce>` directory and the checksums of its files into
`checksums/`; once all have finished, rank 0 writes `megagen.json` (every file's size and checksum), then
`COMPLETE`, renames the directory into place and only then replaces `latest`. A crash at any moment leaves
the previous checkpoint and `latest` intact. Reading checks all of it first: verify.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

from megagen.config import ConfigError
from megagen.fsutil import fsync_dir

FORMAT = "megagen-checkpoint"
VERSION = 1
META = "megagen.json"
COMPLETE = "COMPLETE"
LATEST = "latest"
DCP_METADATA = ".metadata"
RNG_DIR = "rng"
SUMS_DIR = "checksums"  # per-rank checksums of the files each rank wrote; merged into the manifest
_STEP_RE = re.compile(r"^step-(\d+)$")
_TMP_MARK = ".tmp-"


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used: names the config key (or CLI argument) and the file at fault."""

    def __init__(self, key: str, message: str):
        super().__init__(key, message)
        self.detail = message


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def tmp_name(step: int, nonce: str) -> str:
    return f"{step_name(step)}{_TMP_MARK}{nonce}"


def step_of(path: Path) -> int | None:
    m = _STEP_RE.match(path.name)
    return int(m.group(1)) if m else None


def complete_checkpoints(directory: Path) -> list[Path]:
    """Complete `step-*` checkpoints in `directory`, oldest first."""
    if not directory.is_dir():
        return []
    found = [
        p for p in directory.iterdir() if p.is_dir() and step_of(p) is not None and (p / COMPLETE).is_file()
    ]
    return sorted(found, key=lambda p: step_of(p))


def write_file_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename: readers see old or new, never half."""
    tmp = path.with_name(f"{path.name}{_TMP_MARK}{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json(path: Path, obj) -> None:
    write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode("utf-8"))


def write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def read_latest(directory: Path) -> Path | None:
    """The complete checkpoint `latest` names, else the newest complete `step-*` directory, else None."""
    latest = directory / LATEST
    if latest.is_file():
        name = latest.read_text(encoding="utf-8").strip()
        candidate = directory / name
        if name and "/" not in name and step_of(candidate) is not None and (candidate / COMPLETE).is_file():
            return candidate
    found = complete_checkpoints(directory)
    return found[-1] if found else None


def list_files(root: Path) -> dict[str, int]:
    """Relative path → size of every file under `root` (the checkpoint's manifest)."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            full = Path(dirpath) / f
            out[full.relative_to(root).as_posix()] = full.stat().st_size
    return dict(sorted(out.items()))


def collect_sums(tmp: Path) -> dict[str, str]:
    """Merge and remove the per-rank checksum files (`checksums/*.json`) of a checkpoint being published."""
    sums: dict[str, str] = {}
    d = tmp / SUMS_DIR
    if d.is_dir():
        for f in sorted(d.glob("*.json")):
            sums.update(json.loads(f.read_text(encoding="utf-8")))
        shutil.rmtree(d)
    return sums


def publish(tmp: Path, final: Path, meta: dict) -> None:
    """Make a fully written checkpoint visible: manifest + meta, COMPLETE last, then rename into place.

    The manifest has every file's size and checksum (the writing ranks' own, else computed here); COMPLETE
    has the checksum of `megagen.json`.
    """
    from megagen.checkpoint.checksum import ALGORITHM, digest_bytes, digest_files

    sums = collect_sums(tmp)
    files = list_files(tmp)
    missing = [tmp / rel for rel in files if rel not in sums]
    sums.update({p.relative_to(tmp).as_posix(): d for p, d in digest_files(missing).items()})
    meta = dict(meta, files=files, checksum_algorithm=ALGORITHM, checksums={rel: sums[rel] for rel in files})
    raw = json.dumps(meta, indent=1, sort_keys=True).encode("utf-8")
    write_bytes(tmp / META, raw)
    manifest = f"{ALGORITHM}:{digest_bytes(raw)}"
    write_json(tmp / COMPLETE, {"step": meta.get("step"), "completed": time.time(), "manifest": manifest})
    fsync_dir(tmp)
    old = None
    if final.exists():  # a checkpoint of the same step from an abandoned timeline: replace it
        old = final.with_name(f"{final.name}{_TMP_MARK}replaced-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def set_latest(directory: Path, final: Path) -> None:
    write_file_atomic(directory / LATEST, final.name + "\n")


def rotate(directory: Path, keep: int, newest: Path) -> list[Path]:
    """Delete sound checkpoints older than `newest` beyond the `keep` most recent; returns those deleted.

    Only checkpoints whose marker, manifest checksum and file sizes check out count (verify.is_sound), so
    a broken one never pushes a good one out; nothing is deleted unless `newest` itself is sound; and
    checkpoints of a later step (another timeline, e.g. before `checkpoint.resume=PATH`) are left alone,
    so the newest complete checkpoint is never deleted.
    """
    from megagen.checkpoint.verify import is_sound

    if keep <= 0 or not is_sound(newest):
        return []
    older = [p for p in complete_checkpoints(directory) if step_of(p) < step_of(newest) and is_sound(p)]
    doomed = older[: max(0, len(older) - (keep - 1))]
    for p in doomed:
        # Renamed first: a crash half-way through rmtree leaves a `.tmp-*` dir, cleaned at the next start.
        gone = p.with_name(f"{p.name}{_TMP_MARK}rotated-{os.getpid()}")
        os.replace(p, gone)
        shutil.rmtree(gone, ignore_errors=True)
    return doomed


def clean_stale(directory: Path) -> list[Path]:
    """Delete interrupted saves (`*.tmp-*`) left by a crash; returns what was removed."""
    if not directory.is_dir():
        return []
    stale = [p for p in directory.iterdir() if _TMP_MARK in p.name]
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return stale


def resolve_checkpoint(path: str | os.PathLike, key: str) -> Path:
    """A complete checkpoint from a user path: the checkpoint itself, or a directory holding checkpoints."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(key, f"{p} does not exist")
    if _TMP_MARK not in p.name and (p / COMPLETE).is_file():
        return p
    if (p / DCP_METADATA).exists() or step_of(p) is not None or _TMP_MARK in p.name:
        raise CheckpointError(key, f"{p} is an incomplete checkpoint (no {COMPLETE} marker): not loadable")
    found = read_latest(p)
    if found is None:
        raise CheckpointError(key, f"{p} holds no complete checkpoint")
    return found


def open_checkpoint(
    path: str | os.PathLike, key: str, verify: str = "checksum", rank: int = 0, world: int = 1
) -> tuple[Path, dict]:
    """Resolve, read and verify a checkpoint for loading: (directory, meta).

    `verify` is `checkpoint.verify` (checksum | size); with `world` > 1 this rank hashes its share of the
    files only, and the callers agree on the outcome (see verify.py).
    """
    from megagen.checkpoint.verify import read_meta, verify_files

    ckpt = resolve_checkpoint(path, key)
    meta = read_meta(ckpt, key)
    verify_files(ckpt, meta, key, verify, rank, world)
    return ckpt, meta
