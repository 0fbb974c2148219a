"""The plain-PyTorch shard loader: the reference for the DALI one, and the loader where DALI has no wheels.

A `torch.utils.data.DataLoader` over a map-style dataset whose index is a whole `MicroBatchRequest`
(`batch_size=None`, the sampler yields the requests), so one worker reads one micro-batch and the
DataLoader's in-order delivery keeps the request order for any number of workers. With `num_workers=0`
the main process reads, on a read-ahead thread `prefetch` micro-batches ahead (`TorchLoader._read_ahead`,
megagen/data/read_ahead.py; no DataLoader), so the reads and the per-batch Python work overlap the
training step.

A micro-batch is read straight into one packed buffer (`read_packed`, megagen/data/packed_batch.py): the
host batch in the stored dtypes (float16 latents and text, see megagen/data/contract.py), one copy out of
the memory maps and nothing else. The buffers are recycled slots: a ring of `prefetch × workers + 2`
shared-memory slots made before the workers fork (a worker reads batch i into slot i mod ring and hands
over only the slot's number; the pages are mapped and touched once per loader, not once per batch), or
`prefetch + 2` private buffers in the main process. With CUDA (`pin_memory`) batches are instead read into
fresh buffers (worker: shared memory, pinned by DataLoader's pin thread; main process: pinned).

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

from collections.abc import Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from megagen.data.contract import MicroBatchRequest, micro_sizes
from megagen.data.packed_batch import (
    host_specs,
    new_buffer,
    pack_layout,
    read_packed,
    report_skipped,
    to_device,
    unpack_batch,
)
from megagen.data.read_ahead import on_thread


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
            self._slots = [new_buffer(size, shared=workers) for _ in range(count)] if size else []
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
        return on_thread(lambda: (dataset[pair] for pair in enumerate(self.requests)), finish, self.prefetch)

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
            batches = finished = on_thread(lambda: iter(self._dataloader()), self._finish, self.prefetch)
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
