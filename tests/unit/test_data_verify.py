"""`data.verify` at training start-up: each rank checks only its share of the shards (stat + header, or
also the checksum), every other header is read when first used, and a bad shard is still found before
training (by the rank whose share holds it)."""

import os
from types import SimpleNamespace

import pytest
import torch

import megagen.data.shard_reader as shard_reader
from megagen.data.format import DataError
from megagen.data.pipeline import build_data
from megagen.data.shard_reader import ShardReader
from megagen.data.synth import synth
from megagen.data.verify import verify_on_ranks
from megagen.specs import get_spec
from tests.unit.data_helpers import tiny_config


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("verify") / "ds"
    synth(out, preset="video_tiny", samples=48, seed=0, shard_mb=0.02)  # a few shards per bucket
    return out


def _shard_paths(path):
    manifest = ShardReader(path, verify="none").manifest
    return [os.path.join(path, *s.file.split("/")) for b in manifest.buckets for s in b.shards]


def _runtime(rank, world):
    return SimpleNamespace(rank=rank, world_size=world, dp_rank=0, dp_size=1, device=torch.device("cpu"))


def _cfg(path, *overrides):
    return tiny_config(f"data.path={path}", "data.loader=torch", *overrides)


def test_start_up_reads_only_this_ranks_share_of_the_headers(dataset, monkeypatch):
    paths = _shard_paths(dataset)
    assert len(paths) >= 6
    opened = []
    real = shard_reader.parse_header
    monkeypatch.setattr(shard_reader, "parse_header", lambda p: opened.append(p) or real(p))
    data = build_data(_cfg(dataset), get_spec("video"), _runtime(1, 3), steps=10**6)
    assert sorted(opened) == sorted(paths[1::3])
    assert len(data.plan) == 2 * 10**6
    req = data.plan[0]
    data.reader.read_batch(req.bucket, list(req.sample_ids))  # any other shard: its header when first read
    used = {data.reader._locate(req.bucket, i)[0].path for i in req.sample_ids}
    assert sorted(set(opened)) == sorted(set(paths[1::3]) | used)


@pytest.mark.parametrize("mode", ["size", "checksum"])
def test_a_bad_shard_is_found_by_the_rank_whose_share_holds_it(dataset, tmp_path, mode):
    import shutil

    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy)
    paths = _shard_paths(copy)
    victim = paths[4]
    if mode == "size":
        with open(victim, "r+b") as fh:
            fh.truncate(100)
    else:  # same size, one byte changed in the data: only a checksum sees it
        with open(victim, "r+b") as fh:
            fh.seek(-1, 2)
            last = fh.read(1)
            fh.seek(-1, 2)
            fh.write(bytes([last[0] ^ 0xFF]))
    for rank in range(3):
        reader = ShardReader(copy, verify="none")
        if rank == 4 % 3:
            with pytest.raises(DataError) as err:
                verify_on_ranks(reader, mode, rank, 3)
            assert err.value.file == victim
        else:
            verify_on_ranks(reader, mode, rank, 3)
    with pytest.raises(DataError, match="truncated" if mode == "size" else "checksum mismatch"):
        build_data(_cfg(copy, f"data.verify={mode}"), get_spec("video"), _runtime(0, 1), steps=4)
    build_data(_cfg(copy, "data.verify=none"), get_spec("video"), _runtime(0, 1), steps=4)  # checked later
