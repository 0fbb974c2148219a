"""The plain-PyTorch shard loader: the reference for the DALI one, and the loader where DALI has no wheels.

A `torch.utils.data.DataLoader` over a map-style dataset whose index is a whole `MicroBatchRequest`
(`batch_size=None`, the sampler yields the requests), so one worker reads one micro-batch and the
DataLoader's in-order delivery keeps the request order for any number of workers. With `num_workers=0`
the main process reads. On CUDA the batch is pinned by the DataLoader and copied with `non_blocking=True`.

Worker processes start with the platform's default method (fork on Linux); the reader re-opens its
memory maps lazily in each worker.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

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


def report_skipped(request: MicroBatchRequest, reasons) -> None:
    for reason in reasons:
        log.warning("data.on_error=skip: step %d micro %d: skipped %s", request.step, request.micro, reason)


class _RequestDataset(Dataset):
    """Map-style dataset indexed by the request itself."""

    def __init__(self, reader):
        self.reader = reader

    def __getitem__(self, request: MicroBatchRequest):
        return (request, *read_request(self.reader, request))


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
            for request, batch, skipped in batches:
                if skipped:
                    self.skipped += len(skipped)
                    report_skipped(request, skipped)
                if self.device.type != "cpu":
                    batch = {k: v.to(self.device, non_blocking=non_blocking) for k, v in batch.items()}
                yield request, batch
        finally:  # stop the workers now, not when a traceback holding this frame is collected
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
