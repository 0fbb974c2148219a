"""Bad samples in every shard loader: `on_error=skip` placeholders, logs and counts; `on_error=fail` names
the file and sample; out-of-range text lengths are refused or skipped alike."""

from __future__ import annotations

import logging

import pytest
import torch

from megagen.data.format import DataError
from megagen.data.loader_torch import TorchLoader
from megagen.data.loaders import dali_available
from megagen.data.shard_reader import ShardReader
from tests.unit.data_helpers import (
    collect,
    skip_plan,
    write_dataset,
)


@pytest.fixture(scope="module")
def bad_dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("bad"), nan_samples=[("t2_h2_w4", 2)])


def _loaders(path, on_error):
    yield "torch", TorchLoader(ShardReader(path, on_error=on_error), skip_plan(), num_workers=1)
    if dali_available():
        from megagen.data.loader_dali import DaliLoader

        yield "dali", DaliLoader(ShardReader(path, on_error=on_error), skip_plan())
        reader = ShardReader(path, on_error=on_error)
        yield "dali-workers", DaliLoader(reader, skip_plan(), py_num_workers=1, source="workers")
        reader = ShardReader(path, on_error=on_error)
        yield "dali-fields", DaliLoader(reader, skip_plan(), py_num_workers=1, pack=False, source="workers")


def test_skip_puts_placeholders_logs_and_counts(bad_dataset, caplog):
    reference = ShardReader(bad_dataset, on_error="skip")
    for kind, loader in _loaders(bad_dataset, "skip"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="megagen"):
            got = collect(loader)
        assert [r for r, _ in got] == skip_plan(), kind  # requests (and batch shapes) as planned
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
        ("torch-main", TorchLoader(ShardReader(long_text_dataset), skip_plan())),
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
