"""Does a dataset carry what a spec reads? Checked once at start-up, from the manifest alone.

A spec's `sample_shapes(cfg)` names every field it reads with its per-sample shape. Each field must exist
with the same number of dims; the latents' channel count (dim 0) and the width (last dim) of every field
whose shape the manifest fixes for all buckets (text embeddings) must agree too. Token counts and every
size that varies by bucket (latent frames/height/width, feature frames) are free.
Without this check a video config on an audio dataset fails deep inside patchify on the first batch.
"""

from __future__ import annotations

from megagen.data.format import LATENTS, DataError
from megagen.data.manifest import Manifest


def field_mismatches(manifest: Manifest, wanted: dict[str, tuple[int, ...]]) -> list[str]:
    """Each way the dataset differs from the fields `wanted` ({name: per-sample shape}); empty when fine."""
    problems = []
    if not manifest.buckets:
        return ["the dataset has no buckets"]
    bucket = manifest.buckets[0]

    def fixed(name: str) -> bool:  # the manifest says which fields have one shape in every bucket
        return manifest.fields[name].per_sample_shape is not None

    missing = [name for name in wanted if name not in manifest.fields]
    if missing:
        problems.append(f"fields {', '.join(missing)} are missing (it has {', '.join(manifest.fields)})")
    for name, shape in wanted.items():
        if name in missing:
            continue
        have = manifest.field_shape(bucket, name)
        if len(have) != len(shape):
            problems.append(f"field {name!r} has per-sample shape {list(have)}, the spec reads {list(shape)}")
        elif name == LATENTS and have[0] != shape[0]:
            problems.append(f"latents have {have[0]} channels, the spec reads {shape[0]}")
        elif fixed(name) and len(shape) >= 2 and have[-1] != shape[-1]:
            problems.append(f"field {name!r} has width {have[-1]}, the spec reads {shape[-1]}")
    return problems


def check_dataset_fields(manifest: Manifest, spec, cfg, path: str) -> None:
    """Raise DataError naming the dataset when `spec` (as configured by `cfg`) cannot train on it."""
    problems = field_mismatches(manifest, spec.sample_shapes(cfg))
    if problems:
        what = f"spec {cfg.model.spec!r} preset {cfg.model.preset!r}"
        raise DataError(
            f"dataset (written for spec {manifest.spec!r}) does not fit {what}: {'; '.join(problems)}",
            file=path,
        )
