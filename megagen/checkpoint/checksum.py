"""Checksums of checkpoint files: CRC-32 per 16 MiB block, computed by several threads at once.

A file's digest is the hex CRC-32 (zlib) of each 16 MiB block, concatenated (8 characters per block; an
empty file is one empty block). Blocks make one large shard hashable by many threads (`os.pread` and
`zlib.crc32` release the GIL) and let an error say where the damage is. CRC-32 detects every burst of up
to 32 flipped bits and misses random damage with probability 2⁻³² per block: it guards against corruption
(disks, copies, edits), not against a crafted file — safety against those is that loading never executes
anything (safe_reader.py). The stdlib's CRC-32 is the fastest hash it has (see docs/checkpoints.md).
"""

from __future__ import annotations

import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ALGORITHM = "crc32-16MiB"
BLOCK = 16 << 20
_HEX = 8


def default_threads() -> int:
    """Up to 8 hashing threads, sharing the cores with the other ranks of this node (torchrun's
    LOCAL_WORLD_SIZE), which hash their own files at the same time."""
    env = os.environ.get("LOCAL_WORLD_SIZE", "1")
    local = max(1, int(env)) if env.isdigit() else 1
    return max(1, min(8, (os.cpu_count() or 1) // local))


def digest_bytes(data: bytes) -> str:
    """The digest of an in-memory file (e.g. `megagen.json` before it is written)."""
    blocks = [data[i : i + BLOCK] for i in range(0, len(data), BLOCK)] or [b""]
    return "".join(f"{zlib.crc32(b):08x}" for b in blocks)


def _block_crc(path: Path, index: int) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return zlib.crc32(os.pread(fd, BLOCK, index * BLOCK))
    finally:
        os.close(fd)


def digest_files(paths: list[Path], threads: int | None = None) -> dict[Path, str]:
    """{path: digest} of every file, its blocks hashed by `threads` threads (default: up to 8)."""
    tasks = [(p, i) for p in paths for i in range(max(1, -(-p.stat().st_size // BLOCK)))]
    if not tasks:
        return {}
    workers = min(threads or default_threads(), len(tasks))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="megagen-crc") as pool:
        crcs = list(pool.map(lambda t: _block_crc(*t), tasks))
    out: dict[Path, list[str]] = {p: [] for p in paths}
    for (p, _), crc in zip(tasks, crcs):
        out[p].append(f"{crc:08x}")
    return {p: "".join(parts) for p, parts in out.items()}


def first_bad_block(expected: str, actual: str) -> int:
    """Index of the first 16 MiB block whose CRC differs (or where one digest is longer)."""
    n = max(len(expected), len(actual)) // _HEX
    for i in range(n):
        if expected[i * _HEX : (i + 1) * _HEX] != actual[i * _HEX : (i + 1) * _HEX]:
            return i
    return n
