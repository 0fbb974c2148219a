"""One micro-batch in one byte buffer: its layout, the read into it, and its way to the device.

A micro-batch is read into, and handed over as, ONE byte buffer: one shared-memory segment (torch) or one
DALI output per micro-batch instead of one per field, and one host-to-device copy. Its layout follows from
each field's (key, dtype, per-sample shape) and the batch size, so the reading side (a worker, a DALI
callback) and the receiving side compute it alike. Every shard loader goes through here.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from megagen.data.contract import MicroBatchRequest, cast_to_compute
from megagen.data.format import TEXT_LEN_PREFIX
from megagen.data.host_batch import TEXT_VALID_PREFIX, host_batch_specs, text_valid

log = logging.getLogger("megagen")

SAMPLE_VALID = "sample_valid"
"""(B,) bool in every batch of a reader with `on_error="skip"`: False marks a skipped sample's placeholder."""


PACK_ALIGN = 64


@dataclass(frozen=True)
class PackedField:
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


FieldSpec = tuple[str, torch.dtype, tuple[int, ...]]
"""(key, dtype, per-sample shape) of one batch field."""


@functools.lru_cache(maxsize=1024)
def pack_layout(specs: tuple[FieldSpec, ...], n: int) -> tuple[tuple[PackedField, ...], int]:
    """Where each field of an `n`-sample batch sits in the packed buffer, and the buffer's size (cached)."""
    fields, offset = [], 0
    for key, dtype, shape in specs:
        nbytes = n * math.prod(shape) * dtype.itemsize
        fields.append(PackedField(key, dtype, (n, *shape), offset, nbytes))
        offset += -(-nbytes // PACK_ALIGN) * PACK_ALIGN
    return tuple(fields), offset


def unpack_batch(buf: torch.Tensor, specs: tuple[FieldSpec, ...], n: int) -> dict[str, torch.Tensor]:
    """Views of the fields of an `n`-sample packed batch (on the buffer's device)."""
    layout, size = pack_layout(specs, n)
    if buf.numel() != size:
        raise RuntimeError(f"packed batch of {buf.numel()} bytes, expected {size} for {n} samples of {specs}")
    if buf.device.type == "cpu":  # numpy views: cheaper to make than torch ones
        return {k: torch.from_numpy(v) for k, v in _numpy_views(buf, layout).items()}
    return {f.key: buf[f.offset : f.offset + f.nbytes].view(f.dtype).view(f.shape) for f in layout}


def host_specs(reader, bucket: str) -> tuple[FieldSpec, ...]:
    """(key, dtype, per-sample shape) of the host batch of `bucket` (stored dtypes; `sample_valid` last with
    `on_error="skip"`)."""
    cache = reader.__dict__.setdefault("_loader_host_specs", {})
    specs = cache.get(bucket)
    if specs is None:
        stored = host_batch_specs(reader.manifest, reader.sample_shapes(bucket))
        specs = [(k, torch.from_numpy(np.empty(0, t)).dtype, s) for k, t, s in stored]
        if getattr(reader, "on_error", "fail") == "skip":
            specs.append((SAMPLE_VALID, torch.bool, ()))
        specs = cache[bucket] = tuple(specs)
    return specs


_NUMPY_DTYPES: dict[torch.dtype, np.dtype] = {}


def _np_dtype(dtype: torch.dtype) -> np.dtype:
    found = _NUMPY_DTYPES.get(dtype)
    if found is None:
        found = _NUMPY_DTYPES[dtype] = torch.empty(0, dtype=dtype).numpy().dtype
    return found


def _numpy_views(buf: torch.Tensor, layout: tuple[PackedField, ...]) -> dict[str, np.ndarray]:
    raw = buf.numpy()
    views = {}
    for f in layout:
        views[f.key] = raw[f.offset : f.offset + f.nbytes].view(_np_dtype(f.dtype)).reshape(f.shape)
    return views


def new_buffer(size: int, shared: bool = False, pin: bool = False) -> torch.Tensor:
    if shared and hasattr(torch.UntypedStorage, "_new_shared"):  # no copy, unlike share_memory_()
        return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(size))
    if shared:
        return torch.empty(size, dtype=torch.uint8).share_memory_()
    return torch.empty(size, dtype=torch.uint8, pin_memory=pin)


def read_packed(
    reader,
    request: MicroBatchRequest,
    shared: bool = False,
    pin: bool = False,
    out: torch.Tensor | None = None,
    specs: tuple[FieldSpec, ...] | None = None,
    failed_rows: tuple[int, ...] = (),
) -> tuple[torch.Tensor, tuple[FieldSpec, ...], list[str]]:
    """One micro-batch read straight into one packed uint8 buffer: (buffer, its field specs, reasons of
    skipped samples). The buffer holds the host batch (`host_specs`: stored dtypes, `text_valid.<enc>` from
    `text_len.<enc>`), allocated in shared memory (`shared`, for a worker to hand over) or pinned (`pin`).

    With `on_error="skip"` every requested sample has a row and `sample_valid` says which are real; an
    unusable sample's row is a finite placeholder (zeros; `text_valid.*` all True, so attention over it stays
    finite) and its `SampleSkipped` message is returned (strings: they cross process boundaries). Shapes
    stay those of the request, so every rank of a tp/cp group and the loss normaliser agree. With
    `on_error="fail"` the reader raises. `out`: a uint8 buffer of at least the packed size to read into
    instead (the returned buffer is its first bytes). `specs`: the host fields the buffer holds (default all
    of `host_specs`; the DALI map source leaves the latents out, handing them over as views of the map);
    `failed_rows`: rows found unusable elsewhere (with `on_error="skip"`), given placeholders like the ones
    found here.
    """
    ids, n = list(request.sample_ids), len(request.sample_ids)
    specs = host_specs(reader, request.bucket) if specs is None else specs
    layout, size = pack_layout(specs, n)
    buf = out[:size] if out is not None and out.numel() >= size else new_buffer(size, shared, pin)
    views = _numpy_views(buf, layout)
    encoders = list(reader.manifest.text_encoders)
    lengths = {
        TEXT_LEN_PREFIX + e: np.empty(n, dtype=reader.manifest.fields[TEXT_LEN_PREFIX + e].dtype)
        for e in encoders
    }
    targets = {k: v for k, v in views.items() if not k.startswith(TEXT_VALID_PREFIX) and k != SAMPLE_VALID}
    bad = reader.read_into(request.bucket, ids, {**targets, **lengths}) if n else []
    rows = sorted({row for row, _ in bad} | set(failed_rows))
    if rows:
        for v in targets.values():
            v[rows] = 0
    for e in encoders:
        valid = views[TEXT_VALID_PREFIX + e]
        if rows:
            lengths[TEXT_LEN_PREFIX + e][rows] = valid.shape[1]
        text_valid(lengths[TEXT_LEN_PREFIX + e], valid.shape[1], out=valid)
    if SAMPLE_VALID in views:
        views[SAMPLE_VALID][:] = True
        views[SAMPLE_VALID][rows] = False
    return buf, specs, [str(err) for _, err in bad]


def read_request(reader, request: MicroBatchRequest) -> tuple[dict[str, torch.Tensor], list[str]]:
    """One micro-batch as the host batch (views of `read_packed`'s buffer) and skipped samples' reasons."""
    buf, specs, skipped = read_packed(reader, request)
    return unpack_batch(buf, specs, len(request.sample_ids)), skipped


def to_device(
    batch: dict[str, torch.Tensor],
    device: torch.device,
    non_blocking: bool = False,
    owned: bool = True,
    cast: bool = True,
) -> dict[str, torch.Tensor]:
    """A host batch → the batch the training loop gets: on `device`, floating fields in the compute dtype
    (`cast_to_compute`, after the copy; `cast=False` keeps the stored dtypes, for measurements).
    `owned=False`: `batch` lives in memory about to be reused, so every field is copied (floating ones by
    the cast itself)."""
    if device.type != "cpu":
        batch = {k: v.to(device, non_blocking=non_blocking) for k, v in batch.items()}
        owned = True
    out = cast_to_compute(batch) if cast else batch
    if not owned:
        out = {k: v.clone() if v is batch[k] else v for k, v in out.items()}
    return out


def report_skipped(request: MicroBatchRequest, reasons) -> None:
    for reason in reasons:
        log.warning("data.on_error=skip: step %d micro %d: skipped %s", request.step, request.micro, reason)
