"""The plain-PyTorch shard loader: the reference for the DALI one, and the loader where DALI has no wheels.

A `torch.utils.data.DataLoader` over a map-style dataset whose index is a whole `MicroBatchRequest`
(`batch_size=None`, the sampler yields the requests), so one worker reads one micro-batch and the
DataLoader's in-order delivery keeps the request order for any number of workers. With `num_workers=0`
the main process reads, on a read-ahead thread `prefetch` micro-batches ahead (`TorchLoader._read_ahead`;
no DataLoader), so the reads and the per-batch Python work overlap the training step.

A micro-batch is read straight into one packed buffer (`read_packed`): the host batch in the stored dtypes
(float16 latents and text, see megagen/data/contract.py), one copy out of the memory maps and nothing
else. The buffers are recycled slots: a ring of `prefetch × workers + 2` shared-memory slots made before
the workers fork (a worker reads batch i into slot i mod ring and hands over only the slot's number; the
pages are mapped and touched once per loader, not once per batch), or `prefetch + 2` private buffers in
the main process. With CUDA (`pin_memory`) batches are instead read into fresh buffers (worker: shared memory,
pinned by DataLoader's pin thread; main process: pinned).

Batch lifetime: a yielded batch in the compute dtype owns its memory (the cast copies the floating fields,
the others are cloned out of a slot). With `cast=False` on the CPU (measurements) a batch is a view of its
slot and stays valid until the next batch is requested: copy it to keep it longer.

The main process moves the buffer to the device in one piece (`non_blocking=True` on CUDA), unpacks views
there and casts to the compute dtype there (`cast_to_compute`, the one place): on a GPU the
float16 → float32 conversion costs the host nothing and halves the bytes copied.

Worker processes start with the platform's default method (fork on Linux); the reader re-opens its
memory maps lazily in each worker.
"""

from __future__ import annotations

import functools
import logging
import math
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from megagen.data.contract import MicroBatchRequest, cast_to_compute, micro_sizes
from megagen.data.host_batch import host_batch_specs

log = logging.getLogger("megagen")


SAMPLE_VALID = "sample_valid"
"""(B,) bool in every batch of a reader with `on_error="skip"`: False marks a skipped sample's placeholder."""


# ------------------------------------------------------------------------------------------------ packing
# A micro-batch is read into, and handed over as, ONE byte buffer: one shared-memory segment (torch) or one
# DALI output per micro-batch instead of one per field, and one host-to-device copy. Its layout follows from
# each field's (key, dtype, per-sample shape) and the batch size, so either side can compute it.

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


def _buffer(size: int, shared: bool = False, pin: bool = False) -> torch.Tensor:
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
    buf = out[:size] if out is not None and out.numel() >= size else _buffer(size, shared, pin)
    views = _numpy_views(buf, layout)
    encoders = list(reader.manifest.text_encoders)
    lengths = {
        "text_len." + e: np.empty(n, dtype=reader.manifest.fields["text_len." + e].dtype) for e in encoders
    }
    targets = {k: v for k, v in views.items() if not k.startswith("text_valid.") and k != SAMPLE_VALID}
    bad = reader.read_into(request.bucket, ids, {**targets, **lengths}) if n else []
    rows = sorted({row for row, _ in bad} | set(failed_rows))
    if rows:
        for v in targets.values():
            v[rows] = 0
    for e in encoders:
        valid = views["text_valid." + e]
        if rows:
            lengths["text_len." + e][rows] = valid.shape[1]
        np.less(np.arange(valid.shape[1])[None, :], lengths["text_len." + e][:, None], out=valid)
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


def _on_thread(make_items, finish, depth: int, name: str = "megagen-read-ahead") -> Iterator:
    """Iterate `make_items()` on a background thread, `depth` items ahead, applying `finish` there.

    Order is kept (one thread); an exception raised while producing item i is raised by the consumer at
    item i; the thread is stopped and joined when the consumer finishes or stops early."""
    items: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        source = None
        try:
            source = make_items()
            while not stop.is_set():
                try:
                    item = next(source)
                except StopIteration:
                    put((False, None))
                    return
                item = finish(item) if finish is not None else item
                if not put((True, item)):
                    return
        except BaseException as exc:  # raised in the consumer, at this item
            put((False, exc))
        finally:
            close = getattr(source, "_shutdown_workers", None)  # a DataLoader's worker processes
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            ok, item = items.get()
            if ok:
                yield item
            elif item is None:
                return
            else:
                raise item
    finally:
        stop.set()
        thread.join()


class _RequestDataset(Dataset):
    """Map-style dataset indexed by (stream index, request).

    `slots`: shared-memory buffers made in the main process before the workers fork (so every worker and
    the main process map the same pages once, for the whole pass): a worker reads batch i into slot
    i % len(slots) and hands over only the slot's number. Slot reuse is safe because the DataLoader has at
    most `prefetch × workers` batches in flight: batch i + len(slots) (len(slots) = prefetch × workers + 2)
    is only sent to a worker after batch i + 2 was handed out, i.e. after the consumer asked for batch i + 1.
    A batch that does not fit its slot goes into a fresh shared-memory buffer instead (sent as a tensor).
    """

    def __init__(self, reader, pin: bool = False, slots: list[torch.Tensor] | None = None):
        self.reader, self.pin, self.slots = reader, pin, slots or []

    def __getitem__(self, item: tuple[int, MicroBatchRequest]):
        i, request = item
        worker = get_worker_info() is not None
        slot = self.slots[i % len(self.slots)] if self.slots else None
        buf, specs, skipped = read_packed(self.reader, request, shared=worker, pin=self.pin, out=slot)
        if slot is not None and buf.data_ptr() == slot.data_ptr():
            return request, (i % len(self.slots), buf.numel()), specs, skipped
        return request, buf, specs, skipped


class _Indexed:
    """The sampler: (stream index, request) pairs."""

    def __init__(self, requests):
        self.requests = requests

    def __len__(self) -> int:
        return len(self.requests)

    def __iter__(self):
        return enumerate(self.requests)


def _as_is(item):
    return item


class TorchLoader:
    """Iterating yields `(request, batch)` in the order of `requests`; see the module docstring.

    `prefetch`: micro-batches each worker reads ahead (DataLoader's `prefetch_factor`); with 0 workers, the
    depth of the main process's read-ahead thread.
    `pin_memory`: None = pin when `device` is CUDA. `cast=False`: yield the stored dtypes (float16) instead of
    the compute dtype (on the CPU: views of a recycled buffer, valid until the next batch is requested; see
    the module docstring), to measure the loader without the on-device cast. `skipped`: samples skipped so far
    (`data.on_error=skip`: each is logged, its row is a placeholder with `sample_valid` False; see
    `read_packed`).
    """

    def __init__(
        self,
        reader,
        requests: Iterable[MicroBatchRequest],
        num_workers: int = 0,
        prefetch: int = 2,
        pin_memory: bool | None = None,
        device: torch.device | str | None = None,
        cast: bool = True,
    ):
        self.reader, self.requests, self.cast = reader, requests, cast
        self.num_workers, self.prefetch = num_workers, prefetch
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.pin_memory = self.device.type == "cuda" if pin_memory is None else pin_memory
        self.skipped = 0
        self._slots: list[torch.Tensor] | None = None
        self._slots_shared = False

    def __len__(self) -> int:
        return len(self.requests)

    def _slot_bytes(self) -> int:
        """The largest packed micro-batch of `requests` (0 when they cannot be listed up front)."""
        if not (hasattr(self.requests, "__getitem__") and hasattr(self.requests, "__len__")):
            return 0
        micro = micro_sizes(self.requests)
        return max((pack_layout(host_specs(self.reader, b), n)[1] for b, n in micro.items()), default=0)

    def _worker_slots(self) -> list[torch.Tensor]:
        """The shared-memory slots workers read into (see `_RequestDataset`); none when batches are pinned
        for a GPU (DataLoader's pin thread copies each worker's own buffer) or the sizes are unknown."""
        if self.pin_memory:
            return []
        workers = self.num_workers > 0
        if self._slots is None or self._slots_shared != workers:
            size = self._slot_bytes()
            count = self.prefetch * self.num_workers + 2 if workers else self.prefetch + 2
            self._slots = [_buffer(size, shared=workers) for _ in range(count)] if size else []
            for slot in self._slots:  # touch every page now, once, not in the first pass's reads
                slot.zero_()
            self._slots_shared = workers
        return self._slots

    def start(self) -> None:
        """Allocate (and touch) the recycled buffers now; otherwise the first iteration does. Like
        `DaliLoader.start`: a one-time setup cost, kept out of per-batch measurements."""
        self._worker_slots()

    def _read_ahead(self, finish=None) -> Iterator[tuple]:
        """0 workers: the main process reads, on one read-ahead thread (`prefetch` batches ahead; numpy's
        copies release the GIL, so reading overlaps the consumer's step). Items are `_RequestDataset`'s, in
        request order (one thread reads them in order); a read's exception is raised by the consumer at that
        batch. Batch i goes into slot i mod (prefetch + 2): the consumer holds at most one batch and the
        queue `prefetch`, so the thread writing one more never touches a slot still in use. `finish`, when
        given, runs on the thread too (unpack and cast on a CPU device), so the consumer only dequeues."""
        dataset = _RequestDataset(self.reader, pin=self.pin_memory, slots=self._worker_slots())
        return _on_thread(lambda: (dataset[pair] for pair in enumerate(self.requests)), finish, self.prefetch)

    def _dataloader(self) -> DataLoader:
        workers = self.num_workers > 0
        return DataLoader(
            _RequestDataset(self.reader, pin=self.pin_memory and not workers, slots=self._worker_slots()),
            batch_size=None,
            sampler=_Indexed(self.requests),
            num_workers=self.num_workers,
            collate_fn=_as_is,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch if workers else None,
            in_order=True,
        )

    def _finish(self, item: tuple) -> tuple[MicroBatchRequest, dict[str, torch.Tensor]]:
        """A read item → (request, the batch the training loop gets)."""
        request, buf, specs, skipped = item
        if skipped:
            self.skipped += len(skipped)
            report_skipped(request, skipped)
        owned = True
        if isinstance(buf, tuple):  # (slot, bytes): the batch was read into a shared slot
            slot, size = buf
            buf, owned = self._slots[slot][:size], not self.cast
        if self.device.type != "cpu":
            buf = buf.to(self.device, non_blocking=self.device.type == "cuda")
        host = unpack_batch(buf, specs, len(request.sample_ids))
        return request, to_device(host, self.device, owned=owned, cast=self.cast)

    def __iter__(self) -> Iterator[tuple[MicroBatchRequest, dict[str, torch.Tensor]]]:
        if self.num_workers > 0 and self.device.type == "cpu" and self.cast:
            # a thread takes the workers' batches and unpacks + casts them (the cast copies each batch out
            # of its shared slot at once, so the slot ring's bound still holds); the consumer only dequeues
            batches = finished = _on_thread(lambda: iter(self._dataloader()), self._finish, self.prefetch)
        elif self.num_workers > 0:
            batches = iter(self._dataloader())
            finished = (self._finish(item) for item in batches)
        elif self.device.type == "cpu":  # the read-ahead thread also unpacks and casts: nothing left to do
            batches = finished = self._read_ahead(finish=self._finish)
        else:  # the host→device copy stays on the consumer's thread (its CUDA stream)
            batches = self._read_ahead()
            finished = (self._finish(item) for item in batches)
        try:
            yield from finished
        finally:  # stop the workers now, not when a traceback holding this frame is collected
            shutdown = getattr(batches, "_shutdown_workers", None) or getattr(batches, "close", None)
            if shutdown is not None:
                shutdown()
