"""The DALI shard loaders (map and workers sources) yield what the torch loader yields; skip without DALI."""

from __future__ import annotations

import multiprocessing
import threading
from types import SimpleNamespace

import pytest
import torch

from megagen.data.contract import MicroBatchRequest
from megagen.data.loaders import dali_available
from megagen.data.shard_reader import ShardReader
from tests.unit.data_helpers import (
    assert_same,
    collect,
    request_plan,
)

NO_DALI = "nvidia.dali is not installed (pip install nvidia-dali-cuda120)"


def test_latent_pieces_give_every_thread_a_lane():
    from megagen.data.dali_map_source import latent_pieces

    assert latent_pieces(16, 1, 8) == 8 and latent_pieces(16, 2, 8) == 4 and latent_pieces(16, 3, 8) == 4
    assert latent_pieces(16, 8, 8) == 1 and latent_pieces(16, 9, 8) == 1
    assert latent_pieces(3, 1, 2) == 3  # a divisor of the first dim: 3 channels make 3 pieces
    assert latent_pieces(3, 1, 8) == 3  # never more pieces than the first dim has rows
    assert latent_pieces(4, 0, 2) == 4


@pytest.mark.skipif(not dali_available(), reason=NO_DALI)
def test_dali_map_source_matches_torch_loader(dataset, reference):
    """The default source: DALI copies straight out of the memory maps, a micro-batch cut into lanes."""
    from megagen.data.contract import cast_to_compute
    from megagen.data.loader_dali import DaliLoader

    reader = ShardReader(dataset)
    with DaliLoader(reader, request_plan(), num_threads=2) as loader:
        assert loader.source == "map"
        # 8 lanes wanted (4 per thread): 3-sample micro-batches of 4-channel latents cut in 4 → 12 lanes,
        # 1-sample ones in 4 (never more pieces than channels)
        assert loader.max_batch_size == 12 and loader.layouts["t2_h2_w4"].lanes(1) == (4, 4)
        assert_same(collect(loader), reference)
        assert_same(collect(loader), reference)  # a second pass rewinds to request 0
        partial = next(iter(loader))  # a pass abandoned early ...
        assert partial[0] == reference[0][0]
        assert_same(collect(loader), reference)  # ... does not leak its queued batches into the next one
        loader.start()
        source = loader._source
        pieces, rest = source(SimpleNamespace(iteration=0))
        request = reference[0][0]
        c, k = loader.layouts[request.bucket].lanes(len(request.sample_ids))
        assert len(pieces) == len(rest) == k == c * len(request.sample_ids)
        # the latents are handed over uncopied: read-only views of the shard's memory map
        assert all(not p.flags.writeable and not p.flags.owndata for p in pieces)
        assert len({r.nbytes for r in rest}) == 1  # equal lanes, as DALI's dense output needs
        assert any(t.name == "megagen-dali-source" for t in threading.enumerate())
    assert not any(t.name == "megagen-dali-source" for t in threading.enumerate())  # closed with the loader
    with DaliLoader(ShardReader(dataset), request_plan(), num_threads=1, cast=False) as loader:
        assert loader.max_batch_size == 6 and loader.layouts["t2_h2_w4"].lanes(1) == (4, 4)
        assert loader.layouts["t1_h48_w64"].lanes(3) == (2, 6)
        fp16 = collect(loader)
        assert all(b["latents"].dtype == torch.float16 for _, b in fp16)
        assert_same([(r, cast_to_compute(b)) for r, b in fp16], reference)


@pytest.mark.skipif(not dali_available(), reason=NO_DALI)
def test_dali_map_source_sizes_its_pipeline_for_every_micro_batch_size(dataset):
    """Lanes are not monotone in the micro-batch size: with 2 threads (8 lanes wanted) a 4-channel latent
    makes 12 lanes for 3 samples but 8 for 4, so the pipeline must fit the smaller request too."""
    from megagen.data.loader_dali import DaliLoader

    bucket = "t2_h2_w4"
    plan = [
        MicroBatchRequest(0, 0, bucket, (0, 1, 2, 3), (0, 1, 2, 3), 1),
        MicroBatchRequest(1, 0, bucket, (4, 5, 6), (0, 1, 2), 1),
    ]
    reader = ShardReader(dataset)
    want = [(r, reader.to_model_batch(reader.read_batch(r.bucket, list(r.sample_ids)))) for r in plan]
    with DaliLoader(ShardReader(dataset), plan, num_threads=2) as loader:
        assert loader.layouts[bucket].lanes(3)[1] == 12 > loader.layouts[bucket].lanes(4)[1] == 8
        assert loader.max_batch_size == 12
        assert_same(collect(loader), want)


@pytest.mark.skipif(not dali_available(), reason=NO_DALI)
def test_dali_unknown_source_names_the_option(dataset):
    from megagen.data.loader_dali import DaliLoader

    with pytest.raises(ValueError, match="data.dali_source.*'disk'"):
        DaliLoader(ShardReader(dataset), request_plan(), source="disk")


@pytest.mark.skipif(not dali_available(), reason=NO_DALI)
def test_dali_workers_source_matches_torch_loader(dataset, reference):
    from megagen.data.loader_dali import DaliLoader

    # One pipeline for every assertion (DALI's worker start is the slow part).
    with DaliLoader(
        ShardReader(dataset), request_plan(), num_threads=2, py_num_workers=2, source="workers"
    ) as loader:
        assert loader.pack and loader.max_batch_size == 1  # small batches travel packed in one buffer
        assert_same(collect(loader), reference)
        assert_same(collect(loader), reference)  # a second pass rewinds to request 0
        partial = next(iter(loader))  # a pass abandoned early ...
        assert partial[0] == reference[0][0]
        assert_same(collect(loader), reference)  # ... does not leak its queued batches into the next one
        assert loader.skipped == 0
        assert loader.shm_statistics()["capacities"]
    # One output per field: DALI's batch size follows the micro-batch size of each request's bucket.
    with DaliLoader(
        ShardReader(dataset), request_plan(), py_num_workers=1, pack=False, source="workers"
    ) as loader:
        assert loader.max_batch_size == 3
        assert_same(collect(loader), reference)


def _threads_in_child(source):
    source(SimpleNamespace(iteration=0))
    return torch.get_num_threads()


def test_dali_source_runs_single_threaded_in_a_forked_worker(dataset):
    """A forked worker entering the parent's intra-op pool hangs in its first parallel cast (the image
    bucket's batches above are big enough to take that path): the source must drop to one thread."""
    from megagen.data.loader_dali import BatchSource

    source = BatchSource(ShardReader(dataset), request_plan(), ("latents",))
    threads = torch.get_num_threads()
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply(_threads_in_child, (source,)) == 1
    source(SimpleNamespace(iteration=0))  # in the process that built it: leaves the threads alone
    assert torch.get_num_threads() == threads
