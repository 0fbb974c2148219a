"""Decode a few samples of a dataset bucket (`megagen data stats --render N`) to check by eye that the
latents a model trains on decode to the videos they were made from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from megagen.errors import ConfigError
from megagen.media.render import load_decoder, render_latents


def default_bucket(manifest) -> str:
    """The bucket with the most latent frames (first of equals): a video rather than a still, if any."""
    return max(manifest.buckets, key=lambda b: b.latent_shape[1]).name


def render_bucket_samples(
    directory, tae: str, count: int, bucket: str | None = None, out=None, fps: float = 24.0
) -> tuple[str, list[int], Path, list[str]]:
    """Decode `count` evenly spaced samples of `bucket` (each at its recorded fps, else `fps`) into MP4s and
    a contact sheet under `out` (default DIR/renders/<bucket>); returns (bucket, sample ids, out, files)."""
    from megagen.data.format import FPS, LATENTS
    from megagen.data.shard_reader import ShardReader

    reader = ShardReader(directory)
    try:
        name = bucket or default_bucket(reader.manifest)
        if name not in {b.name for b in reader.manifest.buckets}:
            known = ", ".join(b.name for b in reader.manifest.buckets)
            raise ConfigError("--bucket", f"{directory} has no bucket {name!r}; its buckets: {known}")
        total = reader.num_samples(name)
        if total == 0:
            raise ConfigError("--bucket", f"bucket {name} of {directory} holds no samples")
        ids = sorted({int(i) for i in np.linspace(0, total - 1, min(count, total)).round()})
        samples = [reader.read(name, i) for i in ids]  # views of the memory maps: copied before close
        latents = torch.from_numpy(np.stack([np.asarray(s[LATENTS], dtype=np.float32) for s in samples]))
        rates = [float(s[FPS]) if FPS in s and float(s[FPS]) > 0 else fps for s in samples]
    finally:
        reader.close()
    decoder = load_decoder(tae, tuple(latents.shape), f"dataset {directory} (bucket {name})")
    target = Path(out) if out else Path(directory) / "renders" / name
    return name, ids, target, render_latents(decoder, latents, target, rates)
