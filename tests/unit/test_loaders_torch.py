"""The torch shard loader: request order for any number of workers, recycled buffers, read-ahead thread."""

from __future__ import annotations

import threading

import pytest
import torch

from megagen.data.contract import MicroBatchRequest
from megagen.data.format import DataError
from megagen.data.loader_torch import TorchLoader
from megagen.data.shard_reader import ShardReader
from tests.unit.data_helpers import (
    assert_same,
    collect,
    request_plan,
    write_dataset,
)


@pytest.fixture(scope="module")
def bad_dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("bad"), nan_samples=[("t2_h2_w4", 2)])


@pytest.mark.parametrize("workers", [0, 2])
def test_torch_loader_follows_the_requests(dataset, reference, workers):
    loader = TorchLoader(ShardReader(dataset), request_plan(), num_workers=workers, prefetch=2)
    assert_same(collect(loader), reference)


@pytest.mark.parametrize("workers,prefetch", [(0, 2), (1, 1), (2, 1), (2, 3)])
def test_torch_loader_recycles_its_buffers(dataset, reference, workers, prefetch):
    """Batches go through a ring of recycled buffers (prefetch × workers + 2 shared-memory slots, or two in
    the main process) over many more requests than slots: every batch still equals the reference, also
    when the loader is iterated again, and `cast=False` batches are right until the next one is asked for."""
    reader = ShardReader(dataset)
    loader = TorchLoader(reader, request_plan(), num_workers=workers, prefetch=prefetch)
    loader.start()
    slots = loader._slots
    assert len(slots) == (prefetch * workers + 2 if workers else prefetch + 2) < len(request_plan())
    assert_same(collect(loader), reference)
    assert_same(list(loader), reference)  # kept without copying: compute-dtype batches own their memory
    assert loader._slots is slots  # reused across passes
    fp16 = collect(TorchLoader(reader, request_plan(), num_workers=workers, prefetch=prefetch, cast=False))
    assert all(b["latents"].dtype == torch.float16 for _, b in fp16)
    from megagen.data.contract import cast_to_compute

    assert_same([(r, cast_to_compute(b)) for r, b in fp16], reference)


def test_torch_loader_without_slots_reads_fresh_buffers(dataset, reference):
    """Requests that cannot be listed up front (a plain iterator): no slots, one fresh buffer per batch."""
    loader = TorchLoader(ShardReader(dataset), _Unindexed(list(request_plan())), num_workers=1)
    assert_same(collect(loader), reference)
    assert loader._slots == []


class _Unindexed:
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __iter__(self):
        return iter(self.items)


def _read_ahead_threads(before=()):
    """Live read-ahead threads, except those in `before` (left by other tests' abandoned loaders)."""

    return [t for t in threading.enumerate() if t.name == "megagen-read-ahead" and t not in before]


def test_main_process_read_ahead_raises_at_the_failing_batch_and_stops(bad_dataset):
    """0 workers: a read-ahead thread reads; batches come in request order, a read error is raised at its own
    batch (the ones before it are delivered), and the thread is gone afterwards or when the consumer stops."""
    bucket = "t2_h2_w4"
    plan = [
        MicroBatchRequest(0, 0, bucket, (1, 3), (0, 1), 1),
        MicroBatchRequest(1, 0, bucket, (4, 0), (0, 1), 1),
        MicroBatchRequest(2, 0, bucket, (5, 2), (0, 1), 1),  # sample 2 holds a NaN
        MicroBatchRequest(3, 0, bucket, (1, 4), (0, 1), 1),
    ]
    reader = ShardReader(bad_dataset)  # check_finite=True: the eager check raises at read time
    before = set(_read_ahead_threads())
    got = []
    with pytest.raises(DataError, match="sample 2 of bucket t2_h2_w4.*NaN"):
        for req, batch in TorchLoader(reader, plan, num_workers=0, prefetch=1):
            got.append(req)
            assert batch["caption_id"].tolist() == [i + 2000 for i in req.sample_ids]
    assert got == plan[:2]
    assert not _read_ahead_threads(before)
    stream = iter(TorchLoader(reader, plan[:2] * 8, num_workers=0, prefetch=2))
    next(stream)
    assert len(_read_ahead_threads(before)) == 1
    stream.close()  # the consumer stops early: the thread is joined
    assert not _read_ahead_threads(before)
