"""The plain-PyTorch shard loader: the reference for the DALI one, and the loader where DALI has no wheels.

A `torch.utils.data.DataLoader` over a map-style dataset whose index is a whole `MicroBatchRequest`
(`batch_size=None`, the sampler yields the requests), so one worker reads one micro-batch and the
DataLoader's in-order delivery keeps the request order for any number of workers. With `num_workers=0`
the main process reads. A worker packs the batch into one buffer allocated in shared memory (one segment
per micro-batch, not one per field); the main process unpacks views. On CUDA the DataLoader pins that
buffer, it is copied with `non_blocking=True` in one piece and unpacked on the GPU.

Worker processes start with the platform's default method (fork on Linux); the reader re-opens its
memory maps lazily in each worker.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from megagen.data.contract import MicroBatchRequest

log = logging.getLogger("megagen")


SAMPLE_VALID = "sample_valid"
"""(B,) bool in every batch of a reader with `on_error="skip"`: False marks a skipped sample's placeholder."""


def with_placeholders(batch: dict[str, torch.Tensor], valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """Spread the rows of `batch` (the valid samples) over `len(valid)` rows; skipped samples get a finite
    placeholder (zeros; `text_valid.*` all True, so attention over it stays finite) and `sample_valid` False.
    Shapes stay those of the request, so every rank of a tp/cp group and the loss normaliser agree."""
    n = len(valid)
    out = {}
    for k, v in batch.items():
        if len(v) == n:
            out[k] = v
            continue
        fill = torch.ones if k.startswith("text_valid.") else torch.zeros
        full = fill((n, *v.shape[1:]), dtype=v.dtype)
        full[valid] = v
        out[k] = full
    out[SAMPLE_VALID] = valid
    return out


def read_request(reader, request: MicroBatchRequest) -> tuple[dict[str, torch.Tensor], list[str]]:
    """One micro-batch: (batch of `reader.to_model_batch`, reasons of skipped samples).

    With `on_error="skip"` the batch has a row per requested sample plus `sample_valid`; an unusable
    sample's row is a placeholder (see `with_placeholders`) and its `SampleSkipped` message is returned
    (strings: they cross process boundaries). With `on_error="fail"` the reader raises.
    """
    skipped: list = []
    arrays = reader.read_batch(request.bucket, list(request.sample_ids), skipped=skipped)
    batch = reader.to_model_batch(arrays)
    if getattr(reader, "on_error", "fail") == "skip":
        bad = {e.sample for e in skipped}
        batch = with_placeholders(batch, torch.tensor([i not in bad for i in request.sample_ids]))
    return batch, [str(e) for e in skipped]


# ------------------------------------------------------------------------------------------------ packing
# A worker hands a batch over as ONE byte buffer: one shared-memory segment (torch) or one DALI output per
# micro-batch instead of one per field, and one host-to-device copy. Its layout follows from each field's
# (key, dtype, per-sample shape) and the batch size, so either side can compute it.

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


def field_specs(batch: dict[str, torch.Tensor]) -> tuple[FieldSpec, ...]:
    return tuple((k, v.dtype, tuple(v.shape[1:])) for k, v in batch.items())


def pack_layout(specs: tuple[FieldSpec, ...], n: int) -> tuple[tuple[PackedField, ...], int]:
    """Where each field of an `n`-sample batch sits in the packed buffer, and the buffer's size."""
    fields, offset = [], 0
    for key, dtype, shape in specs:
        nbytes = n * math.prod(shape) * dtype.itemsize
        fields.append(PackedField(key, dtype, (n, *shape), offset, nbytes))
        offset += -(-nbytes // PACK_ALIGN) * PACK_ALIGN
    return tuple(fields), offset


def pack_batch(batch: dict[str, torch.Tensor], shared: bool = False) -> torch.Tensor:
    """The batch as one uint8 buffer (`shared`: allocated in shared memory, for a worker to hand over)."""
    n = len(next(iter(batch.values())))
    layout, size = pack_layout(field_specs(batch), n)
    if shared and hasattr(torch.UntypedStorage, "_new_shared"):  # no copy, unlike share_memory_()
        buf = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(size))
    elif shared:
        buf = torch.empty(size, dtype=torch.uint8).share_memory_()
    else:
        buf = torch.empty(size, dtype=torch.uint8)
    for f in layout:
        buf[f.offset : f.offset + f.nbytes].view(f.dtype).view(f.shape).copy_(batch[f.key])
    return buf


def unpack_batch(buf: torch.Tensor, specs: tuple[FieldSpec, ...], n: int) -> dict[str, torch.Tensor]:
    """Views of the fields of an `n`-sample packed batch (on the buffer's device)."""
    layout, size = pack_layout(specs, n)
    if buf.numel() != size:
        raise RuntimeError(f"packed batch of {buf.numel()} bytes, expected {size} for {n} samples of {specs}")
    return {f.key: buf[f.offset : f.offset + f.nbytes].view(f.dtype).view(f.shape) for f in layout}


def report_skipped(request: MicroBatchRequest, reasons) -> None:
    for reason in reasons:
        log.warning("data.on_error=skip: step %d micro %d: skipped %s", request.step, request.micro, reason)


class _RequestDataset(Dataset):
    """Map-style dataset indexed by the request itself."""

    def __init__(self, reader):
        self.reader = reader

    def __getitem__(self, request: MicroBatchRequest):
        batch, skipped = read_request(self.reader, request)
        if get_worker_info() is None:  # read in the main process: nothing to hand over
            return request, batch, None, skipped
        return request, pack_batch(batch, shared=True), field_specs(batch), skipped


def _as_is(item):
    return item


class TorchLoader:
    """Iterating yields `(request, batch)` in the order of `requests`; see the module docstring.

    `prefetch`: micro-batches each worker reads ahead (DataLoader's `prefetch_factor`; unused with 0 workers).
    `pin_memory`: None = pin when `device` is CUDA. `skipped`: samples skipped so far (`data.on_error=skip`:
    each is logged, its row is a placeholder with `sample_valid` False; see `read_request`).
    """

    def __init__(
        self,
        reader,
        requests: Iterable[MicroBatchRequest],
        num_workers: int = 0,
        prefetch: int = 2,
        pin_memory: bool | None = None,
        device: torch.device | str | None = None,
    ):
        self.reader, self.requests = reader, requests
        self.num_workers, self.prefetch = num_workers, prefetch
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.pin_memory = self.device.type == "cuda" if pin_memory is None else pin_memory
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.requests)

    def _dataloader(self) -> DataLoader:
        workers = self.num_workers > 0
        return DataLoader(
            _RequestDataset(self.reader),
            batch_size=None,
            sampler=self.requests,
            num_workers=self.num_workers,
            collate_fn=_as_is,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch if workers else None,
            in_order=True,
        )

    def __iter__(self) -> Iterator[tuple[MicroBatchRequest, dict[str, torch.Tensor]]]:
        non_blocking = self.device.type == "cuda"
        batches = iter(self._dataloader())
        try:
            for request, data, specs, skipped in batches:
                if skipped:
                    self.skipped += len(skipped)
                    report_skipped(request, skipped)
                if specs is None:  # a dict of tensors, read here
                    if self.device.type != "cpu":
                        data = {k: v.to(self.device, non_blocking=non_blocking) for k, v in data.items()}
                    yield request, data
                    continue
                if self.device.type != "cpu":
                    data = data.to(self.device, non_blocking=non_blocking)
                yield request, unpack_batch(data, specs, len(request.sample_ids))
        finally:  # stop the workers now, not when a traceback holding this frame is collected
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
