"""The checkpoint directory on disk: names, the completion marker, `latest`, validation, errors.

    <checkpoint.dir>/
      latest                         "step-000008": the newest complete checkpoint (replaced atomically)
      step-000004/                   one complete checkpoint
        .metadata  __<rank>_0.distcp DCP: tensors (model, optimizer state, EMA), sharded by the saving ranks
        megagen.json                 rank 0: step, spec, preset, mesh, sampler, schedule, config, file sizes
        rng/rank-00000.json          each rank's RNG state
        COMPLETE                     written last; a directory without it is never loaded
      step-000008.tmp-<nonce>/       a save in progress (or one interrupted by a crash): ignored, and
                                     deleted when the next run starts

Every rank writes its shards into the `.tmp-<nonce>` directory; once all have finished, rank 0 writes
`megagen.json` (with every file's size), then `COMPLETE`, renames the directory into place and only then
replaces `latest`. A crash at any moment leaves the previous checkpoint and `latest` intact.
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
_STEP_RE = re.compile(r"^step-(\d+)$")
_TMP_MARK = ".tmp-"


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used: names the config key (or CLI argument) and the file at fault."""


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
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1, sort_keys=True)
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


def publish(tmp: Path, final: Path, meta: dict) -> None:
    """Make a fully written checkpoint visible: manifest + meta, COMPLETE last, then rename into place."""
    meta = dict(meta, files=list_files(tmp))
    write_json(tmp / META, meta)
    write_json(tmp / COMPLETE, {"step": meta.get("step"), "completed": time.time()})
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
    """Delete complete checkpoints beyond the `keep` most recent (never `newest`); returns those deleted."""
    if keep <= 0:
        return []
    others = [p for p in complete_checkpoints(directory) if p.resolve() != newest.resolve()]
    doomed = others[: max(0, len(others) - (keep - 1))]
    for p in doomed:
        # Remove the marker first: a crash half-way through rmtree leaves an incomplete (ignored) dir.
        (p / COMPLETE).unlink(missing_ok=True)
        shutil.rmtree(p, ignore_errors=True)
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


def read_meta(ckpt: Path, key: str) -> dict:
    try:
        meta = json.loads((ckpt / META).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(key, f"{ckpt}: {META} is missing") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(key, f"{ckpt}: {META} is unreadable ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(key, f"{ckpt}: {META} is not a {FORMAT} file")
    if meta.get("version", 0) > VERSION:
        raise CheckpointError(key, f"{ckpt}: format version {meta['version']} is newer than this megagen's")
    return meta


def validate_files(ckpt: Path, meta: dict, key: str) -> None:
    """Every file of the manifest is present with its recorded size (missing shard / truncated file)."""
    files = meta.get("files") or {}
    if DCP_METADATA not in files:
        raise CheckpointError(key, f"{ckpt}: the manifest in {META} lists no {DCP_METADATA}")
    for rel, size in files.items():
        f = ckpt / rel
        if not f.is_file():
            kind = "shard file" if rel.endswith(".distcp") else "file"
            raise CheckpointError(key, f"{ckpt}: {kind} {rel} is missing")
        actual = f.stat().st_size
        if actual != size:
            raise CheckpointError(
                key, f"{ckpt}: file {rel} is truncated or altered: {actual} bytes, expected {size}"
            )


def open_checkpoint(path: str | os.PathLike, key: str) -> tuple[Path, dict]:
    """Resolve, read and validate a checkpoint for loading: (directory, meta)."""
    ckpt = resolve_checkpoint(path, key)
    meta = read_meta(ckpt, key)
    validate_files(ckpt, meta, key)
    return ckpt, meta
