"""Trusting a checkpoint before reading it: the marker, the manifest's checksum, then every file's.

Order matters: `COMPLETE` records the checksum of `megagen.json`, which is checked before anything in
`megagen.json` (step, schedule, sizes, checksums) is believed; then every file of the manifest must be
present with its size (all ranks: a `stat` each); then, with `checkpoint.verify=checksum`, each rank
hashes its share of the files (`share`: on the saving mesh rank r gets `__r_0.distcp`, the shard it reads;
the rest is balanced by size), so every file is hashed once, in parallel, and the ranks agree on the
outcome. The DCP index is read (safely) by every rank: it may only name files of the manifest and holds
no pickled "bytes" entries.

Checkpoints written before megagen recorded checksums (no checksum in `COMPLETE`) are accepted with
sizes verified only, and a one-line warning.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from megagen.checkpoint.checksum import ALGORITHM, digest_bytes, digest_files, first_bad_block
from megagen.checkpoint.layout import COMPLETE, DCP_METADATA, FORMAT, META, VERSION, CheckpointError

log = logging.getLogger("megagen")

MODES = ("checksum", "size")
MANIFEST_KEY = "manifest"  # in COMPLETE: "<algorithm>:<digest of megagen.json>"


def read_marker(ckpt: Path, key: str) -> dict:
    """The `COMPLETE` marker (JSON: step, time and, since checksums exist, the manifest's checksum)."""
    try:
        marker = json.loads((ckpt / COMPLETE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(key, f"{ckpt} is an incomplete checkpoint (no {COMPLETE} marker)") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(key, f"{ckpt}: {COMPLETE} is unreadable ({exc})") from None
    if not isinstance(marker, dict):
        raise CheckpointError(key, f"{ckpt}: {COMPLETE} is not a megagen marker")
    return marker


def read_meta(ckpt: Path, key: str) -> dict:
    """`megagen.json`, after checking it against the checksum `COMPLETE` recorded for it."""
    marker = read_marker(ckpt, key)
    try:
        raw = (ckpt / META).read_bytes()
    except FileNotFoundError:
        raise CheckpointError(key, f"{ckpt}: {META} is missing") from None
    except OSError as exc:
        raise CheckpointError(key, f"{ckpt}: {META} is unreadable ({exc})") from None
    recorded = marker.get(MANIFEST_KEY)
    if recorded is not None:
        algorithm, _, digest = str(recorded).partition(":")
        if algorithm != ALGORITHM:
            raise CheckpointError(key, f"{ckpt}: {COMPLETE} uses checksum {algorithm!r}, unknown here")
        if digest_bytes(raw) != digest:
            raise CheckpointError(
                key, f"{ckpt}: {META} does not match the checksum in {COMPLETE}: it was edited or is corrupt"
            )
    try:
        meta = json.loads(raw.decode("utf-8"))
    except ValueError as exc:
        raise CheckpointError(key, f"{ckpt}: {META} is unreadable ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(key, f"{ckpt}: {META} is not a {FORMAT} file")
    if meta.get("version", 0) > VERSION:
        raise CheckpointError(key, f"{ckpt}: format version {meta['version']} is newer than this megagen's")
    if recorded is None and "checksums" in meta:
        raise CheckpointError(key, f"{ckpt}: {META} lists checksums but {COMPLETE} has none for {META}")
    return meta


def share(files: dict[str, int], rank: int, world: int) -> list[str]:
    """The files rank `rank` of `world` hashes: disjoint, together all of them, balanced by bytes."""
    owner: dict[str, int] = {}
    load = [0] * world
    for r in range(world):  # DCP names rank r's shard __r_0.distcp: the file rank r reads on that mesh
        name = f"__{r}_0.distcp"
        if name in files:
            owner[name] = r
            load[r] += files[name]
    for rel in sorted(set(files) - set(owner), key=lambda k: (-files[k], k)):
        r = min(range(world), key=lambda i: (load[i], i))
        owner[rel] = r
        load[r] += files[rel]
    return sorted(rel for rel, r in owner.items() if r == rank)


def check_sizes(ckpt: Path, meta: dict, key: str) -> dict[str, int]:
    """Every file of the manifest is present with its recorded size (missing shard / truncated file)."""
    files = meta.get("files")
    if not isinstance(files, dict) or DCP_METADATA not in files:
        raise CheckpointError(key, f"{ckpt}: the manifest in {META} lists no {DCP_METADATA}")
    for rel, size in files.items():
        parts = str(rel).split("/")
        if rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts):
            raise CheckpointError(key, f"{ckpt}: the manifest names a file outside the checkpoint: {rel!r}")
        if not isinstance(size, int):
            raise CheckpointError(key, f"{ckpt}: the manifest records no size for {rel}")
        f = ckpt / rel
        if not f.is_file():
            kind = "shard file" if rel.endswith(".distcp") else "file"
            raise CheckpointError(key, f"{ckpt}: {kind} {rel} is missing")
        actual = f.stat().st_size
        if actual != size:
            raise CheckpointError(
                key, f"{ckpt}: file {rel} is truncated or altered: {actual} bytes, expected {size}"
            )
    return files


def check_checksums(ckpt: Path, meta: dict, key: str, names: list[str], threads: int | None = None) -> None:
    """Hash `names` (relative paths) and compare with the manifest; the first mismatch is named."""
    if meta.get("checksum_algorithm") != ALGORITHM:
        raise CheckpointError(
            key, f"{ckpt}: {META} uses checksum {meta.get('checksum_algorithm')!r}, unknown to this megagen"
        )
    recorded = meta.get("checksums")
    if not isinstance(recorded, dict):
        raise CheckpointError(key, f"{ckpt}: {META} has no checksum table")
    for rel in names:
        if not isinstance(recorded.get(rel), str):
            raise CheckpointError(key, f"{ckpt}: {META} records no checksum for {rel}")
    actual = digest_files([ckpt / rel for rel in names], threads)
    for rel in names:
        got, want = actual[ckpt / rel], recorded[rel]
        if got != want:
            block = first_bad_block(want, got)
            raise CheckpointError(
                key, f"{ckpt}: file {rel} fails its checksum (16 MiB block {block}): the file is corrupt"
            )


def check_index(ckpt: Path, files: dict[str, int], key: str) -> None:
    """The DCP index reads safely (no code, no pickled bytes entries) and names only manifest files."""
    from megagen.checkpoint.safe_reader import read_index

    index = read_index(ckpt, key)
    for info in (index.storage_data or {}).values():
        if info.relative_path not in files:
            raise CheckpointError(
                key, f"{ckpt}: {DCP_METADATA} names data file {info.relative_path}, which the manifest lacks"
            )


def verify_files(
    ckpt: Path, meta: dict, key: str, mode: str = "checksum", rank: int = 0, world: int = 1
) -> None:
    """Check a checkpoint's files as `mode` says; under several ranks each hashes its `share`."""
    if mode not in MODES:
        raise CheckpointError("checkpoint.verify", f"{mode!r} is not one of {', '.join(MODES)}")
    files = check_sizes(ckpt, meta, key)
    if mode == "checksum" and "checksums" in meta:
        check_checksums(ckpt, meta, key, share(files, rank, world))
    elif mode == "checksum" and rank == 0:
        log.warning("checkpoint %s has no checksums (saved by an older megagen): sizes verified only", ckpt)
    check_index(ckpt, files, key)


def is_sound(ckpt: Path) -> bool:
    """A complete checkpoint whose marker, manifest checksum and file sizes check out (no hashing of
    data: cheap enough for rotation to ask of every checkpoint it counts)."""
    try:
        check_sizes(ckpt, read_meta(ckpt, "checkpoint.keep"), "checkpoint.keep")
    except CheckpointError:
        return False
    return True
