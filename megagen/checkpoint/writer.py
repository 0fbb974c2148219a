"""DCP's file writer, plus: each rank hashes the files it just wrote, in parallel with the other ranks.

The checksums go to `checkpoint/checksums/rank-NNNNN.json` before the rank's write returns to DCP, i.e.
before DCP gathers the write results on rank 0; so when rank 0 publishes (after its save returned or its
future completed) every rank's checksums are on disk and `publish` merges them into the manifest. The
files are still in the page cache, and with async saves this happens in the background writer.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch.distributed.checkpoint import FileSystemWriter
from torch.futures import Future

from megagen.checkpoint.checksum import digest_files
from megagen.checkpoint.layout import SUMS_DIR


class ChecksummingWriter(FileSystemWriter):
    """FileSystemWriter that records the checksums of this rank's data files (and `extra` files)."""

    def __init__(self, path, rank: int, extra: tuple[Path, ...] = (), **kwargs):
        super().__init__(path, **kwargs)
        self._root = Path(path)
        self._rank = rank
        self._extra = tuple(extra)

    def write_data(self, plan, planner) -> Future:
        results = super().write_data(plan, planner).wait()
        written = sorted({self._root / r.storage_data.relative_path for r in results})
        sums = digest_files([*written, *self._extra])
        d = self._root / SUMS_DIR
        d.mkdir(exist_ok=True)
        table = {p.relative_to(self._root).as_posix(): digest for p, digest in sums.items()}
        (d / f"rank-{self._rank:05d}.json").write_text(json.dumps(table, sort_keys=True), encoding="utf-8")
        done: Future = Future()
        done.set_result(results)
        return done
