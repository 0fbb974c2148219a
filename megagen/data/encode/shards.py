"""Encoded clips → shard files of the dataset format (the same writer and layout as `megagen data pack`).

Each rank keeps one buffer per bucket and writes it as a shard once it reaches the target size (and at the
end); shard names carry the rank, so ranks never write the same file. `build_manifest` turns every rank's
finished shards into the one manifest, written last by rank 0.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from megagen.data.encode.progress import DoneList, ShardRecord
from megagen.data.format import (
    CAPTION_ID,
    DURATION,
    FPS,
    LATENTS,
    SCALAR_FIELDS,
    SHARD_SUFFIX,
    TEXT_DTYPE,
    TEXT_LEN_DTYPE,
    TEXT_LEN_PREFIX,
    TEXT_PREFIX,
    bucket_name,
)
from megagen.data.manifest import BucketInfo, Manifest, ShardInfo, TextEncoderInfo, standard_fields
from megagen.data.shard_format import shard_metadata
from megagen.data.shard_writer import write_shard


@dataclass
class EncodedClip:
    key: str
    latent: np.ndarray
    """(C, T, H, W) in the dataset's latent dtype."""
    text: dict[str, np.ndarray]
    fps: float
    duration: float
    caption_id: int


@dataclass
class _Bucket:
    clips: list[EncodedClip] = field(default_factory=list)
    nbytes: int = 0


class RankShardWriter:
    """Buffers this rank's clips per bucket; writes a shard when a bucket reaches `target_bytes`."""

    def __init__(self, out: str, rank: int, first_index: int, text: dict[str, TextEncoderInfo], target_bytes):
        self.out, self.rank, self.next_index = out, rank, first_index
        self.text, self.target_bytes = text, target_bytes
        self.done = DoneList(out, rank)
        self.buckets: dict[str, _Bucket] = {}

    def add(self, clip: EncodedClip) -> None:
        name = bucket_name(clip.latent.shape)
        b = self.buckets.setdefault(name, _Bucket())
        b.clips.append(clip)
        b.nbytes += clip.latent.nbytes + sum(i.max_len * i.dim * 2 for i in self.text.values())
        if b.nbytes >= self.target_bytes:
            self._flush(name)

    def close(self) -> None:
        for name in list(self.buckets):
            self._flush(name)

    def _flush(self, name: str) -> None:
        clips = self.buckets.pop(name).clips
        if not clips:
            return
        file = f"{name}/shard-r{self.rank:05d}-{self.next_index:05d}{SHARD_SUFFIX}"
        self.next_index += 1
        size, sha = write_shard(
            os.path.join(self.out, file), self._arrays(clips), shard_metadata(name, len(clips))
        )
        info = ShardInfo(file, len(clips), size, sha)
        record = ShardRecord(
            info, name, tuple(clips[0].latent.shape), [c.key for c in clips], [c.fps for c in clips]
        )
        self.done.shard(record)

    def _arrays(self, clips: list[EncodedClip]) -> dict[str, np.ndarray]:
        """The shard's arrays in the layout `megagen data pack` writes (text zero-padded to max_len)."""
        n = len(clips)
        arrays = {LATENTS: np.stack([c.latent for c in clips])}
        for enc, info in self.text.items():
            emb = np.zeros((n, info.max_len, info.dim), dtype=TEXT_DTYPE)
            lens = np.empty(n, dtype=TEXT_LEN_DTYPE)
            for i, c in enumerate(clips):
                emb[i, : len(c.text[enc])] = c.text[enc]
                lens[i] = len(c.text[enc])
            arrays[TEXT_PREFIX + enc], arrays[TEXT_LEN_PREFIX + enc] = emb, lens
        arrays[FPS] = np.array([c.fps for c in clips], dtype=SCALAR_FIELDS[FPS])
        arrays[DURATION] = np.array([c.duration for c in clips], dtype=SCALAR_FIELDS[DURATION])
        arrays[CAPTION_ID] = np.array([c.caption_id for c in clips], dtype=SCALAR_FIELDS[CAPTION_ID])
        return arrays


def build_manifest(
    records: list[ShardRecord], latent_dtype: str, text: dict[str, TextEncoderInfo], extra: dict
) -> Manifest:
    """One manifest over every rank's finished shards: buckets by latent shape, shards by file name."""
    by_bucket: dict[str, list[ShardRecord]] = {}
    for r in sorted(records, key=lambda r: (r.latent_shape[1:], r.info.file)):
        by_bucket.setdefault(r.bucket, []).append(r)
    buckets = [
        BucketInfo(name, rs[0].latent_shape, sum(r.info.samples for r in rs), [r.info for r in rs])
        for name, rs in by_bucket.items()
    ]
    return Manifest(
        spec="video",
        latent_channels=records[0].latent_shape[0],
        latent_dtype=latent_dtype,
        text_encoders=text,
        fps_values=sorted({f for r in records for f in r.fps}),
        fields=standard_fields(latent_dtype, text),
        buckets=buckets,
        extra=extra,
    )
