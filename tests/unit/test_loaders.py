"""Shard loaders: torch and DALI yield the same samples in the same order; skips; `data.loader` choice."""

from __future__ import annotations

import logging
import multiprocessing
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megagen.config import ConfigError
from megagen.data.contract import MicroBatchRequest
from megagen.data.format import DataError
from megagen.data.loader_torch import TorchLoader
from megagen.data.loaders import dali_available, make_loader
from megagen.data.manifest import BucketInfo, Manifest, TextEncoderInfo, standard_fields
from megagen.data.sampler import BucketPlan, BucketSampler, RequestPlan
from megagen.data.shard_format import parse_header, shard_file
from megagen.data.shard_reader import ShardReader
from megagen.data.shard_writer import DatasetWriter

ENCODERS = {"ul2": TextEncoderInfo(dim=6, max_len=5), "byt5": TextEncoderInfo(dim=4, max_len=3)}
# bucket → (latent shape, samples, shards, global batch, micro batch): an image bucket with big micro-batches,
# video buckets with small ones, different shapes, several shards per bucket.
BUCKETS = {
    "t1_h48_w64": ((4, 1, 48, 64), 24, 3, 6, 3),  # 3 × 12,288 values: torch casts them in parallel
    "t3_h4_w4": ((4, 3, 4, 4), 10, 2, 2, 2),
    "t2_h2_w4": ((4, 2, 2, 4), 7, 1, 2, 1),
}


def write_dataset(path, buckets=BUCKETS, nan_samples=(), text_lens=()):
    """A small dataset whose values identify their sample; `nan_samples`: (bucket, id) with NaN latents;
    `text_lens`: (bucket, id, encoder, length) stored as that sample's text length, valid or not."""
    writer = DatasetWriter(path, plan_key="test")
    infos = []
    for b, (name, (shape, n, n_shards, _, _)) in enumerate(buckets.items()):
        ids = np.arange(n)
        arrays = {
            "latents": (ids[:, None] * 100 + b + np.arange(np.prod(shape)) / 64)
            .reshape(n, *shape)
            .astype(np.float16),
            "fps": np.full(n, 24.0, np.float32) + b,
            "duration": ids.astype(np.float32) / 8,
            "caption_id": ids.astype(np.int64) + 1000 * b,
        }
        for k, (enc, info) in enumerate(ENCODERS.items()):
            ramp = np.arange(info.max_len * info.dim).reshape(info.max_len, info.dim) / 32
            text = ids[:, None, None] + ramp
            arrays[f"text.{enc}"] = (text + k).astype(np.float16)
            arrays[f"text_len.{enc}"] = (1 + (ids + k) % info.max_len).astype(np.int32)
        for bucket, i in nan_samples:
            if bucket == name:
                arrays["latents"][i, 0, 0, 0, 0] = np.nan
        for bucket, i, enc, length in text_lens:
            if bucket == name:
                arrays[f"text_len.{enc}"][i] = length
        bounds = np.linspace(0, n, n_shards + 1).astype(int)
        shards = [
            writer.write(shard_file(name, s), name, {k: v[lo:hi] for k, v in arrays.items()})
            for s, (lo, hi) in enumerate(zip(bounds, bounds[1:]))
        ]
        infos.append(BucketInfo(name, shape, n, shards))
    manifest = Manifest(
        spec="video",
        latent_channels=4,
        latent_dtype="float16",
        text_encoders=ENCODERS,
        fps_values=[24.0],
        fields=standard_fields("float16", ENCODERS),
        buckets=infos,
    )
    writer.finish(manifest)
    return path


def request_plan(steps=10, seed=3, buckets=BUCKETS):
    plans = [BucketPlan(name, n, g, m) for name, (_, n, _, g, m) in buckets.items()]
    return RequestPlan(BucketSampler(plans, seed), steps, dp_rank=0, dp_size=1)


def collect(loader):
    return [(req, {k: v.clone() for k, v in batch.items()}) for req, batch in loader]


def assert_same(got, want):
    assert [r for r, _ in got] == [r for r, _ in want]
    for (req, a), (_, b) in zip(got, want):
        assert a.keys() == b.keys(), req
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, (req, k)
            assert torch.equal(a[k], b[k]), (req, k)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def reference(dataset):
    """Every request of the plan read directly, one by one, from a fresh reader."""
    reader = ShardReader(dataset)
    plan = request_plan()
    return [(r, reader.to_model_batch(reader.read_batch(r.bucket, list(r.sample_ids)))) for r in plan]


def test_request_stream_mixes_buckets_and_micro_batch_sizes(reference):
    sizes = {(r.bucket, len(r.sample_ids)) for r, _ in reference}
    assert {b for b, _ in sizes} == set(BUCKETS) and len({n for _, n in sizes}) == 3, sizes
    latents = {r.bucket: tuple(b["latents"].shape[1:]) for r, b in reference}
    assert latents == {name: spec[0] for name, spec in BUCKETS.items()}
    first, batch = reference[0]
    assert batch["latents"].dtype == torch.float32 and batch["text_valid.ul2"].dtype == torch.bool
    offset = 1000 * list(BUCKETS).index(first.bucket)
    assert batch["caption_id"].tolist() == [i + offset for i in first.sample_ids]


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


def _skip_plan():
    bucket = "t2_h2_w4"
    return [
        MicroBatchRequest(0, 0, bucket, (1, 2, 3), (0, 1, 2), 2),
        MicroBatchRequest(0, 1, bucket, (2,), (3,), 2),  # every sample bad
        MicroBatchRequest(1, 0, bucket, (4, 0), (0, 1), 1),
    ]


@pytest.fixture(scope="module")
def bad_dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("bad"), nan_samples=[("t2_h2_w4", 2)])


def _loaders(path, on_error):
    yield "torch", TorchLoader(ShardReader(path, on_error=on_error), _skip_plan(), num_workers=1)
    if dali_available():
        from megagen.data.loader_dali import DaliLoader

        yield "dali", DaliLoader(ShardReader(path, on_error=on_error), _skip_plan())
        reader = ShardReader(path, on_error=on_error)
        yield "dali-workers", DaliLoader(reader, _skip_plan(), py_num_workers=1, source="workers")
        reader = ShardReader(path, on_error=on_error)
        yield "dali-fields", DaliLoader(reader, _skip_plan(), py_num_workers=1, pack=False, source="workers")


def test_skip_puts_placeholders_logs_and_counts(bad_dataset, caplog):
    reference = ShardReader(bad_dataset, on_error="skip")
    for kind, loader in _loaders(bad_dataset, "skip"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="megagen"):
            got = collect(loader)
        assert [r for r, _ in got] == _skip_plan(), kind  # requests (and batch shapes) as planned
        valid = [b["sample_valid"].tolist() for _, b in got]
        assert valid == [[True, False, True], [False], [True, True]], kind
        for req, batch in got:
            assert len(batch["latents"]) == len(req.sample_ids) and batch["latents"].dtype == torch.float32
            for row, (i, ok) in enumerate(zip(req.sample_ids, batch["sample_valid"].tolist())):
                if ok:
                    want = reference.to_model_batch(reference.read(req.bucket, i))
                    assert all(torch.equal(batch[k][row], want[k][0]) for k in want), (kind, i)
                else:  # a finite placeholder: zero latents and text, every text token valid
                    assert not batch["latents"][row].any() and batch["text_valid.ul2"][row].all()
        assert loader.skipped == 2, kind
        logged = [r.getMessage() for r in caplog.records]
        assert len(logged) == 2, logged
        assert all("sample 2 of bucket t2_h2_w4" in m and "NaN" in m for m in logged), logged
        close = getattr(loader, "close", None)
        if close:
            close()


def test_fail_names_the_file_and_sample(bad_dataset):
    for kind, loader in _loaders(bad_dataset, "fail"):
        with pytest.raises((DataError, RuntimeError)) as err:
            collect(loader)
        assert "shard-00000.safetensors" in str(err.value) and "sample 2" in str(err.value), kind
        close = getattr(loader, "close", None)
        if close:
            close()


@pytest.fixture(scope="module")
def long_text_dataset(tmp_path_factory):
    """Sample 2 of t2_h2_w4 claims 1000 ul2 tokens (max_len 5); sample 4 a negative byt5 length."""
    lens = [("t2_h2_w4", 2, "ul2", 1000), ("t2_h2_w4", 4, "byt5", -1)]
    return write_dataset(tmp_path_factory.mktemp("long"), text_lens=lens)


def test_out_of_range_text_length_fails_in_every_loader(long_text_dataset):
    """The range `megagen data check` enforces is enforced on read by every loader and source."""
    for kind, loader in [
        ("torch-main", TorchLoader(ShardReader(long_text_dataset), _skip_plan())),
        *_loaders(long_text_dataset, "fail"),
    ]:
        with pytest.raises((DataError, RuntimeError)) as err:
            collect(loader)
        msg = str(err.value)
        assert "t2_h2_w4/shard-00000.safetensors: sample 2 of bucket t2_h2_w4: " in msg, (kind, msg)
        assert "text_len.ul2 is 1000, outside [0, 5]" in msg, (kind, msg)
        close = getattr(loader, "close", None)
        if close:
            close()


def test_out_of_range_text_length_is_skipped_and_counted(long_text_dataset, caplog):
    reasons = {2: "text_len.ul2 is 1000, outside [0, 5]", 4: "text_len.byt5 is -1, outside [0, 3]"}
    for kind, loader in _loaders(long_text_dataset, "skip"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="megagen"):
            got = collect(loader)
        valid = [b["sample_valid"].tolist() for _, b in got]
        assert valid == [[True, False, True], [False], [False, True]], kind
        for _, batch in got:  # a skipped row is the usual finite placeholder
            bad = ~batch["sample_valid"]
            assert not batch["latents"][bad].any() and batch["text_valid.ul2"][bad].all(), kind
        assert loader.skipped == 3, kind
        logged = [r.getMessage() for r in caplog.records]
        assert len(logged) == 3, (kind, logged)
        for m, i in zip(logged, (2, 2, 4)):
            assert f"sample {i} of bucket t2_h2_w4: {reasons[i]}" in m, (kind, m)
        close = getattr(loader, "close", None)
        if close:
            close()


def test_auto_falls_back_to_torch_with_one_log_line(dataset, monkeypatch, caplog):
    import megagen.data.loaders as loaders

    monkeypatch.setattr(loaders, "dali_available", lambda: False)
    with caplog.at_level(logging.INFO, logger="megagen"):
        loader = make_loader("auto", ShardReader(dataset), request_plan(2), num_workers=0)
    assert isinstance(loader, TorchLoader)
    assert len(caplog.records) == 1 and "nvidia.dali is not installed" in caplog.records[0].getMessage()
    with pytest.raises(ConfigError, match="data.loader"):
        make_loader("dali", ShardReader(dataset), request_plan(2))
    with pytest.raises(ConfigError, match="data.loader"):
        make_loader("tensorflow", ShardReader(dataset), request_plan(2))


def test_make_loader_picks_by_kind(dataset):
    reader, plan = ShardReader(dataset), request_plan(2)
    torch_loader = make_loader("torch", reader, plan, num_workers=0, prefetch=3)
    assert isinstance(torch_loader, TorchLoader) and torch_loader.prefetch == 3
    if dali_available():
        from megagen.data.loader_dali import DaliLoader

        loader = make_loader("auto", reader, plan, num_workers=1, prefetch=3, threads=1)
        assert isinstance(loader, DaliLoader) and loader.device_id is None
        assert (loader.prefetch_queue_depth, loader.num_threads, loader.py_num_workers) == (3, 1, 1)


def test_host_batch_keeps_the_stored_dtypes_and_the_cast_is_exact(dataset):
    """Loaders read float16 up to the device and cast there: the same values as casting on the host."""
    from megagen.data.contract import cast_to_compute
    from megagen.data.loader_torch import read_request

    reader = ShardReader(dataset)
    for req in request_plan(4):
        host, skipped = read_request(reader, req)
        assert (
            not skipped and host["latents"].dtype == torch.float16 and host["text.ul2"].dtype == torch.float16
        )
        model = reader.to_model_batch(reader.read_batch(req.bucket, list(req.sample_ids)))
        cast = cast_to_compute(host)
        assert cast.keys() == model.keys()
        assert all(cast[k].dtype == model[k].dtype and torch.equal(cast[k], model[k]) for k in model)
    fp16 = collect(TorchLoader(reader, request_plan(4), cast=False))
    assert all(b["latents"].dtype == torch.float16 for _, b in fp16)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_finite_check_of_large_samples_copies_in_chunks(tmp_path, monkeypatch, bad):
    """Large latents are checked chunk by chunk while copied: a bad value anywhere fails (on_error=fail) or
    skips the sample (on_error=skip); good samples come out bit-identical."""
    monkeypatch.setattr(ShardReader, "_SMALL_SAMPLE", 0)  # every field takes the chunked path
    monkeypatch.setattr(ShardReader, "_CHUNK", 7)  # chunks that do not divide the sample
    bucket = "t2_h2_w4"
    path = write_dataset(tmp_path, buckets={bucket: BUCKETS[bucket]})
    clean = ShardReader(path).read_batch(bucket, [0, 1, 3])["latents"].copy()
    shard = ShardReader(path)._locate(bucket, 0)[0].path
    entry = parse_header(shard).tensors["latents"]
    with open(shard, "r+b") as f:  # sample 1, its last value (a later chunk): bad
        f.seek(entry.start + 2 * (2 * int(np.prod(BUCKETS[bucket][0])) - 1))
        f.write(np.array([bad], np.float16).tobytes())
    with pytest.raises(DataError, match="sample 1 of bucket t2_h2_w4.*NaN or inf"):
        ShardReader(path, verify="none").read_batch(bucket, [0, 1, 3])
    skipped = []
    got = ShardReader(path, on_error="skip", verify="none").read_batch(bucket, [0, 1, 3], skipped=skipped)
    assert [e.sample for e in skipped] == [1]
    assert np.array_equal(got["latents"].view(np.uint16), clean[[0, 2]].view(np.uint16))
    unchecked = ShardReader(path, verify="none", check_finite=False).read_batch(bucket, [1])
    assert not np.isfinite(unchecked["latents"]).all()


def _read_ahead_threads(before=()):
    """Live read-ahead threads, except those in `before` (left by other tests' abandoned loaders)."""
    import threading

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
