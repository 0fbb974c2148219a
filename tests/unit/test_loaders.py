"""The loader interface: `data.loader` choice and registry, the request stream, the host batch and its
cast, and the reader's chunked finite check every shard loader relies on."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from megagen.config import ConfigError
from megagen.data.format import DataError
from megagen.data.loader_torch import TorchLoader
from megagen.data.loaders import dali_available, make_loader
from megagen.data.shard_format import parse_header
from megagen.data.shard_reader import ShardReader
from tests.unit.data_helpers import (
    BUCKETS,
    collect,
    request_plan,
    write_dataset,
)


def test_request_stream_mixes_buckets_and_micro_batch_sizes(reference):
    sizes = {(r.bucket, len(r.sample_ids)) for r, _ in reference}
    assert {b for b, _ in sizes} == set(BUCKETS) and len({n for _, n in sizes}) == 3, sizes
    latents = {r.bucket: tuple(b["latents"].shape[1:]) for r, b in reference}
    assert latents == {name: spec[0] for name, spec in BUCKETS.items()}
    first, batch = reference[0]
    assert batch["latents"].dtype == torch.float32 and batch["text_valid.ul2"].dtype == torch.bool
    offset = 1000 * list(BUCKETS).index(first.bucket)
    assert batch["caption_id"].tolist() == [i + offset for i in first.sample_ids]


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
    from megagen.data.packed_batch import read_request

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


def test_the_config_schema_offers_exactly_the_registered_loaders():
    """`data.loader` choices come from the schema; the kinds from the registry: one must not drift from the
    other (adding a loader means a `LOADERS` entry and a schema choice). Likewise DALI's sources."""
    import dataclasses

    from megagen.config.schema import DataConfig
    from megagen.data.loader_dali import SOURCES
    from megagen.data.loaders import KINDS

    choices = {f.name: f.metadata.get("choices") for f in dataclasses.fields(DataConfig)}
    assert tuple(choices["loader"]) == KINDS
    assert tuple(choices["dali_source"]) == SOURCES
