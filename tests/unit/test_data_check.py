"""Bad data: each case fails with the file (and sample) named, at open or at read time; check lists all."""

import json
import os

import numpy as np
import pytest
import safetensors.numpy

from megagen.data.check import check_dataset, dataset_stats
from megagen.data.format import MANIFEST_NAME, DataError, SampleSkipped
from megagen.data.shard_format import sha256_file, shard_metadata
from megagen.data.shard_reader import ShardReader
from megagen.data.shard_writer import write_shard
from megagen.data.synth import synth

BUCKET = "t4_h8_w8"


@pytest.fixture
def ds(tmp_path):
    """A synthetic dataset with several shards per bucket (4 samples per t4_h8_w8 shard)."""
    synth(tmp_path / "ds", samples=24, shard_mb=0.035)
    return tmp_path / "ds"


def _shard(ds, k=1):
    return str(ds / BUCKET / f"shard-{k:05d}.safetensors")


def _rewrite(ds, k, edit):
    """Rewrite shard k with edit(arrays) applied and record its new size/sha256 in the manifest, so only the
    edited content is wrong."""
    path = _shard(ds, k)
    arrays = safetensors.numpy.load_file(path)
    edit(arrays)
    size, sha = write_shard(path, arrays, shard_metadata(BUCKET, len(arrays["caption_id"])))
    mpath = ds / MANIFEST_NAME
    m = json.loads(mpath.read_text())
    for b in m["buckets"]:
        for s in b["shards"]:
            if s["file"] == f"{BUCKET}/shard-{k:05d}.safetensors":
                s["bytes"], s["sha256"] = size, sha
    mpath.write_text(json.dumps(m))


def _first_of_shard(reader, k):
    return sum(s.samples for s in reader.buckets[BUCKET].shards[:k])


def test_sound_dataset_has_no_problems_and_stats_count_tokens(ds):
    assert check_dataset(ds) == []
    st = dataset_stats(ds)
    by_name = {b.name: b for b in st.buckets}
    assert by_name["t1_h16_w16"].tokens_per_sample == 64 and by_name["t8_h8_w12"].tokens_per_sample == 192
    assert st.samples == 24 and st.tokens == 8 * 64 + 8 * 64 + 8 * 192
    assert st.bytes == sum(
        os.path.getsize(os.path.join(d, f))
        for d, _, fs in os.walk(ds)
        for f in fs
        if f.endswith(".safetensors")
    )
    assert "total" in st.format()


def test_missing_shard(ds):
    os.remove(_shard(ds))
    with pytest.raises(DataError, match="shard file is missing") as err:
        ShardReader(ds)
    assert err.value.file == _shard(ds)
    assert [(p.file, p.message) for p in check_dataset(ds)] == [(_shard(ds), "shard file is missing")]
    reader = ShardReader(ds, verify="none", on_error="skip")  # found at read time instead
    with pytest.raises(SampleSkipped, match="missing") as err:
        reader.read(BUCKET, _first_of_shard(reader, 1))
    assert err.value.file == _shard(ds) and err.value.sample == _first_of_shard(reader, 1)


def test_truncated_shard(ds):
    size = os.path.getsize(_shard(ds))
    with open(_shard(ds), "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(DataError, match=f"truncated: {size - 100} bytes, the manifest records {size}") as err:
        ShardReader(ds)
    assert _shard(ds) in str(err.value)
    problems = check_dataset(ds)
    assert len(problems) == 1 and problems[0].file == _shard(ds) and "truncated" in problems[0].message

    fail = ShardReader(ds, verify="none")
    first = _first_of_shard(fail, 1)
    assert fail.read(BUCKET, 0)["latents"].shape == (16, 4, 8, 8)  # other shards still read
    with pytest.raises(DataError, match=f"sample {first + 1} of bucket {BUCKET}: truncated"):
        fail.read(BUCKET, first + 1)
    skip = ShardReader(ds, verify="none", on_error="skip")
    skipped = []
    batch = skip.read_batch(BUCKET, [0, first, first + 1, 1], skipped=skipped)
    assert len(batch["latents"]) == 2 and [e.sample for e in skipped] == [first, first + 1]
    assert all(isinstance(e, SampleSkipped) and e.file == _shard(ds) for e in skipped)
    with pytest.raises(SampleSkipped):  # without a list to collect them, the skip propagates
        skip.read_batch(BUCKET, [first])


def test_checksum_mismatch(ds):
    with open(_shard(ds), "r+b") as f:  # same size, one low mantissa bit of a float16 flipped
        f.seek(-2, os.SEEK_END)
        byte = f.read(1)
        f.seek(-2, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x01]))
    ShardReader(ds)  # sizes and headers are fine: only a checksum finds it
    with pytest.raises(DataError, match="checksum mismatch") as err:
        ShardReader(ds, verify="checksum")
    assert err.value.file == _shard(ds)
    problems = check_dataset(ds)
    assert [p.file for p in problems] == [_shard(ds)] and "checksum mismatch" in problems[0].message


def test_sample_shape_disagreeing_with_bucket(ds):
    _rewrite(ds, 1, lambda a: a.update(latents=np.zeros((len(a["latents"]), 16, 4, 8, 6), np.float16)))
    with pytest.raises(
        DataError,
        match=r"latent shape \[16, 4, 8, 6\], but bucket t4_h8_w8 has shape "
        r"\[16, 4, 8, 8\]",
    ) as err:
        ShardReader(ds)
    assert err.value.file == _shard(ds) and "samples 0-" in str(err.value)
    problems = check_dataset(ds)
    assert len(problems) == 1 and problems[0].file == _shard(ds) and "shape" in problems[0].message


def test_nan_latents_named_by_sample(ds):
    def poison(a):
        a["latents"][1, 3, 0, 0, 0] = np.nan
        a["latents"][2, 0, 1, 2, 3] = np.inf
        a["text.ul2"][0, 0, 0] = np.nan
        a["text_len.byt5"][3] = 99

    _rewrite(ds, 1, poison)
    reader = ShardReader(ds, verify="checksum")  # the files are intact; the values are not
    first = _first_of_shard(reader, 1)
    problems = [str(p) for p in check_dataset(ds)]
    where = f"{_shard(ds)}: sample {{}} of bucket {BUCKET}: "
    assert problems == [
        where.format(first + 1) + "latents hold NaN or inf (row 1 of this shard)",
        where.format(first + 2) + "latents hold NaN or inf (row 2 of this shard)",
        where.format(first) + "text.ul2 holds NaN or inf (row 0 of this shard)",
        where.format(first + 3) + "text_len.byt5 is 99, outside [0, 8] (row 3 of this shard)",
    ]
    with pytest.raises(DataError, match=f"sample {first + 1} of bucket {BUCKET}: latents hold NaN") as err:
        reader.read(BUCKET, first + 1)
    assert not isinstance(err.value, SampleSkipped) and err.value.file == _shard(ds)
    with pytest.raises(DataError, match=f"sample {first + 2} "):
        reader.read_batch(BUCKET, [first, first + 2])
    skip = ShardReader(ds, on_error="skip")
    with pytest.raises(SampleSkipped):
        skip.read(BUCKET, first + 2)
    skipped = []
    batch = skip.read_batch(BUCKET, [first, first + 1, first + 2, first + 3], skipped=skipped)
    assert batch["caption_id"].shape == (1,) and [e.sample for e in skipped] == [
        first + 1,
        first + 2,
        first + 3,
    ]
    assert skipped[2].reason == "text_len.byt5 is 99, outside [0, 8]"  # the check's rule, applied on read
    assert ShardReader(ds, check_finite=False).read(BUCKET, first + 1)["latents"].shape == (16, 4, 8, 8)


def test_every_problem_is_listed(ds):
    os.remove(_shard(ds, 0))
    with open(_shard(ds, 1), "r+b") as f:
        f.truncate(500)
    shard = str(ds / "t8_h8_w12" / "shard-00000.safetensors")
    with open(shard, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        f.write(b"\x01")
    problems = check_dataset(ds)
    assert sorted(p.file for p in problems) == sorted([_shard(ds, 0), _shard(ds, 1), shard])
    assert sha256_file(shard) in next(p.message for p in problems if p.file == shard)


def test_manifest_problems(ds):
    path = ds / MANIFEST_NAME
    m = json.loads(path.read_text())
    m["buckets"][0]["samples"] += 1
    path.write_text(json.dumps(m))
    (problem,) = check_dataset(ds)
    assert problem.file == str(path) and "its shards hold" in problem.message
    path.write_text("{not json")
    with pytest.raises(DataError, match="cannot read the manifest"):
        ShardReader(ds)
    os.remove(path)
    with pytest.raises(DataError, match="no manifest"):
        ShardReader(ds)
