"""Damaged and crafted checkpoints for the tests: flipped bytes, edited manifests, pickled payloads.

`plant_bytes_payload` builds the attack of issue 14 item 3: the DCP index keeps to DCP's own classes but
marks one key as a "bytes" entry whose data (a pickle appended to a shard) writes `marker` when
unpickled with `weights_only=False`; the manifest is resealed to match (sizes, checksums), so only a reader
that refuses bytes entries (or never unpickles them) is safe.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import torch

META = "megagen.json"
COMPLETE = "COMPLETE"


class WriteMarker:
    """Unpickling this (weights_only=False) creates the file `path`: proof that a payload ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('payload ran')",))


def reseal(ckpt: Path) -> None:
    """Make the manifest match the files again: sizes, checksums (when it has them) and the checksum of
    `megagen.json` in `COMPLETE` — what a forger, or someone editing a checkpoint on purpose, would do."""
    meta = json.loads((ckpt / META).read_text())
    for name in meta["files"]:
        meta["files"][name] = (ckpt / name).stat().st_size
    if "checksums" in meta:
        from megagen.checkpoint.checksum import digest_bytes

        for name in meta["files"]:
            meta["checksums"][name] = digest_bytes((ckpt / name).read_bytes())
    write_meta(ckpt, meta)


def write_meta(ckpt: Path, meta: dict) -> None:
    """Write `megagen.json` and record its checksum in `COMPLETE` (when the marker has one)."""
    raw = json.dumps(meta, indent=1, sort_keys=True).encode()
    (ckpt / META).write_bytes(raw)
    marker = json.loads((ckpt / COMPLETE).read_text())
    if "manifest" in marker:
        from megagen.checkpoint.checksum import ALGORITHM, digest_bytes

        marker["manifest"] = f"{ALGORITHM}:{digest_bytes(raw)}"
        (ckpt / COMPLETE).write_text(json.dumps(marker))


def make_legacy(ckpt: Path) -> None:
    """Turn a checkpoint into one as megagen wrote them before checksums (sizes only)."""
    meta = json.loads((ckpt / META).read_text())
    meta.pop("checksums", None)
    meta.pop("checksum_algorithm", None)
    (ckpt / META).write_text(json.dumps(meta, indent=1, sort_keys=True))
    marker = json.loads((ckpt / COMPLETE).read_text())
    marker.pop("manifest", None)
    (ckpt / COMPLETE).write_text(json.dumps(marker))


def plant_bytes_payload(ckpt: Path, marker: Path, key: str = "model.pos_t.weight", shard="__0_0.distcp"):
    """Turn tensor `key` of checkpoint `ckpt` into a bytes entry holding a payload that writes `marker`."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    from megagen.checkpoint.safe_reader import load_dcp_metadata

    index_path = ckpt / ".metadata"
    index = load_dcp_metadata(index_path.read_bytes(), "test", str(index_path))
    buf = io.BytesIO()
    torch.save(WriteMarker(marker), buf)
    payload = buf.getvalue()
    shard_path = ckpt / shard
    offset = shard_path.stat().st_size
    with open(shard_path, "ab") as fh:
        fh.write(payload)
    index.state_dict_metadata[key] = BytesStorageMetadata()
    index.storage_data = {k: v for k, v in index.storage_data.items() if k.fqn != key}
    index.storage_data[MetadataIndex(key)] = _StorageInfo(shard, offset, len(payload))
    index_path.write_bytes(pickle.dumps(index))
    reseal(ckpt)


def flip_byte(path: Path, offset: int | None = None) -> None:
    """Invert one byte of `path` in place (the middle one by default): same size, different content."""
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def edit_meta(ckpt: Path, old: str, new: str) -> None:
    """Replace text `old` by `new` in `megagen.json` (e.g. one character of `last_epoch`)."""
    path = ckpt / META
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))
