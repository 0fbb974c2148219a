"""The host batch: what a loader hands over for one micro-batch before the device copy and the cast.

Fields in their *stored* dtypes (float16 latents and text), `text_valid.<enc>` masks in place of the stored
text lengths; megagen/data/contract.py names the keys. Every loader and `ShardReader.to_model_batch` build it
from here, so the torch loader, the DALI loaders and direct reads agree to the bit.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from megagen.data.format import LATENTS, TEXT_LEN_PREFIX, TEXT_PREFIX
from megagen.data.manifest import Manifest

TEXT_VALID_PREFIX = "text_valid."


def _latent_or_text(name: str) -> bool:
    return name == LATENTS or name.startswith(TEXT_LEN_PREFIX) or name.startswith(TEXT_PREFIX)


def host_batch_specs(
    manifest: Manifest, shapes: dict[str, tuple[int, ...]]
) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    """(key, numpy dtype, per-sample shape) of every field of the host batch of a bucket whose per-sample
    field shapes are `shapes` (`ShardReader.sample_shapes`): latents, then each encoder's text and mask,
    then the rest in stored order."""
    fields = manifest.fields
    specs = [(LATENTS, np.dtype(fields[LATENTS].dtype), shapes[LATENTS])]
    for enc in manifest.text_encoders:
        name = TEXT_PREFIX + enc
        specs.append((name, np.dtype(fields[name].dtype), shapes[name]))
        specs.append((TEXT_VALID_PREFIX + enc, np.dtype(bool), shapes[name][:1]))
    for name, shape in shapes.items():
        if _latent_or_text(name):
            continue
        specs.append((name, np.dtype(fields[name].dtype), shape))
    return specs


def text_valid(lengths: np.ndarray, max_len: int, out: np.ndarray | None = None) -> np.ndarray:
    """(B, max_len) bool key mask of texts with `lengths` tokens: position j is valid when j < length. The
    one statement of the mask, for direct reads and every loader (`out`: write it there)."""
    return np.less(np.arange(max_len)[None, :], lengths[:, None], out=out)


def _tensor(a: np.ndarray):
    """A torch tensor over `a`'s memory; a read-only or strided view of the map is copied first."""
    import torch

    a = np.asarray(a)
    if not a.flags.writeable or not a.flags.c_contiguous:
        a = np.array(a, order="C")
    return torch.from_numpy(a)


def to_host_batch(manifest: Manifest, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """Arrays from `read_batch` (or one `read` sample) → the host batch: torch tensors over the same
    memory in the *stored* dtypes (`latents`, `text.<enc>` float16 as stored), `text_valid.<enc>` bool
    from `text_len.<enc>` (dropped); see megagen/data/contract.py. `cast_to_compute` makes it the model
    batch (the loaders do that on the device, after the host-to-device copy)."""
    import torch

    latent_rank = len(manifest.buckets[0].latent_shape) if manifest.buckets else 4
    if arrays[LATENTS].ndim == latent_rank:  # a single sample: add the batch dim
        arrays = {k: np.asarray(v)[None] for k, v in arrays.items()}
    out: dict[str, Any] = {LATENTS: _tensor(arrays[LATENTS])}
    for enc in manifest.text_encoders:
        text = arrays[TEXT_PREFIX + enc]
        lengths = np.asarray(arrays[TEXT_LEN_PREFIX + enc])
        out[TEXT_PREFIX + enc] = _tensor(text)
        out[TEXT_VALID_PREFIX + enc] = torch.from_numpy(text_valid(lengths, text.shape[1]))
    for name, a in arrays.items():
        if not _latent_or_text(name):
            out[name] = _tensor(a)
    return out


def to_model_batch(manifest: Manifest, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """Arrays from `read_batch` (or one `read` sample) → the training batch of megagen/data/contract.py on
    the host: `to_host_batch`, then `cast_to_compute` (`latents`, `text.<enc>` float32, `text_valid.<enc>`
    bool, `fps`, `duration` float32, `caption_id` int64; extra fields as tensors, floating ones float32).
    The loaders instead move the host batch to the device first and cast there."""
    from megagen.data.contract import cast_to_compute

    return cast_to_compute(to_host_batch(manifest, arrays))
