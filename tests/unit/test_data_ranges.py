"""Out-of-range per-sample fields (`text_len.E` beyond max_len) are never trained on: every loader checks the
rule `megagen data check` reports with, at read time, whatever `data.verify` and `data.check_finite` say."""

import json
import math
import shutil

import numpy as np
import pytest
import safetensors.numpy

from megagen.data.check import check_dataset
from megagen.data.format import MANIFEST_NAME, DataError
from megagen.data.shard_format import shard_metadata
from megagen.data.shard_reader import ShardReader
from megagen.data.shard_writer import write_shard
from megagen.train import train
from tests.unit.data_helpers import TINY_BUCKET, local_data, synth_tiny, tiny_run_config

BUCKET = TINY_BUCKET


def _cfg(tmp_path, *overrides):
    return tiny_run_config(tmp_path, "train.steps=4", *overrides)


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """A dataset (manifest sizes and checksums intact) whose sample drawn at step 2 claims 1000 ul2 tokens
    (max_len 8): (dataset, shard path, sample)."""
    clean = synth_tiny(tmp_path_factory.mktemp("clean") / "ds")
    plan = local_data(_cfg(tmp_path_factory.mktemp("plan"), f"data.path={clean}"), 4).plan
    sample = next(r.sample_ids[0] for r in plan if r.step == 1)
    ds = tmp_path_factory.mktemp("bad") / "ds"
    shutil.copytree(clean, ds)
    shard, local = ShardReader(ds)._locate(BUCKET, sample)
    arrays = safetensors.numpy.load_file(shard.path)
    arrays["text_len.ul2"][local] = 1000
    size, sha = write_shard(shard.path, arrays, shard_metadata(BUCKET, len(arrays["caption_id"])))
    manifest = json.loads((ds / MANIFEST_NAME).read_text())
    for b in manifest["buckets"]:
        for s in b["shards"]:
            if shard.path.endswith(s["file"]):
                s["bytes"], s["sha256"] = size, sha
    (ds / MANIFEST_NAME).write_text(json.dumps(manifest))
    return ds, shard.path, sample


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_training_fails_naming_file_bucket_and_sample(bad, tmp_path, loader):
    ds, path, sample = bad
    where = f"{path}: sample {sample} of bucket {BUCKET}: text_len.ul2 is 1000, outside [0, 8]"
    overrides = [
        f"data.path={ds}",
        f"data.loader={loader}",
        "data.verify=checksum",
        "data.check_finite=eager",
    ]
    with pytest.raises(DataError) as err:
        train(_cfg(tmp_path, *overrides))
    assert str(err.value) == where
    assert [str(p).split(" (row")[0] for p in check_dataset(ds)] == [where]  # the same rule, the same words


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_on_error_skip_trains_without_the_sample_and_counts_it(bad, tmp_path, loader):
    ds, _, _ = bad
    result = train(_cfg(tmp_path, f"data.path={ds}", f"data.loader={loader}", "data.on_error=skip"))
    assert all(math.isfinite(x) for x in result.losses), result.losses
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped_samples", 0) for r in records] == [0, 1, 1, 1]


def test_check_reports_every_bad_length_with_its_value(bad, tmp_path):
    ds, path, _ = bad
    copy = tmp_path / "ds"
    shutil.copytree(ds, copy)
    reader = ShardReader(copy)
    shard, _ = reader._locate(BUCKET, 0)
    arrays = safetensors.numpy.load_file(shard.path)
    arrays["text_len.byt5"][:2] = np.array([-3, 9], np.int32)
    write_shard(shard.path, arrays, shard_metadata(BUCKET, len(arrays["caption_id"])))
    messages = [p.message for p in check_dataset(copy) if p.file == shard.path and "text_len" in p.message]
    assert "text_len.byt5 is -3, outside [0, 8] (row 0 of this shard)" in messages, messages
    assert "text_len.byt5 is 9, outside [0, 8] (row 1 of this shard)" in messages, messages
