"""Latent-shard format: exact round trips, shard splitting, packing with bucket rules, resume, pickling."""

import json
import os
import pickle

import numpy as np
import pytest
import safetensors.numpy
import torch

from megagen.data import shard_writer
from megagen.data.check import check_dataset
from megagen.data.format import (
    FORMAT_NAME,
    MANIFEST_NAME,
    PROGRESS_NAME,
    DataError,
    bucket_name,
    parse_bucket_list,
    tokens_per_sample,
)
from megagen.data.manifest import (
    BucketInfo,
    FieldInfo,
    Manifest,
    TextEncoderInfo,
    load_manifest,
    standard_fields,
)
from megagen.data.pack import pack
from megagen.data.shard_format import shard_file
from megagen.data.shard_reader import ShardReader
from megagen.data.shard_writer import DatasetWriter, plan_shards
from megagen.data.synth import class_latent, synth

ENCODERS = {"ul2": TextEncoderInfo(dim=6, max_len=5), "byt5": TextEncoderInfo(dim=4, max_len=3)}


def _random_shard(rng, n, latent_shape, extra_shape):
    arrays = {
        "latents": rng.standard_normal((n, *latent_shape)).astype(np.float16),
        "fps": rng.uniform(8, 30, n).astype(np.float32),
        "duration": rng.uniform(1, 16, n).astype(np.float32),
        "caption_id": rng.integers(0, 1 << 40, n).astype(np.int64),
        "motion": rng.standard_normal(n).astype(np.float32),  # extra, same shape everywhere
        "lowres": rng.standard_normal((n, *extra_shape)).astype(np.float16),  # extra, bucket-dependent
    }
    for enc, info in ENCODERS.items():
        lens = rng.integers(1, info.max_len + 1, n).astype(np.int32)
        text = rng.standard_normal((n, info.max_len, info.dim)).astype(np.float16)
        text[np.arange(info.max_len)[None, :] >= lens[:, None]] = 0
        arrays[f"text.{enc}"], arrays[f"text_len.{enc}"] = text, lens
    return arrays


def _write_random_dataset(out, rng, plan):
    """plan: {latent (T, H, W): [shard sizes]} → (manifest, {bucket: arrays concatenated over shards})."""
    fields = standard_fields("float16", ENCODERS)
    fields["motion"] = FieldInfo("float32", ())
    fields["lowres"] = FieldInfo("float16", None)
    writer = DatasetWriter(out, "test")
    buckets, expected = [], {}
    for thw, sizes in plan.items():
        latent_shape = (16, *thw)
        name = bucket_name(latent_shape)
        extra_shape = (4, thw[1] // 2, thw[2] // 2)
        info = BucketInfo(name, latent_shape, sum(sizes), [], {"lowres": extra_shape})
        parts = []
        for k, n in enumerate(sizes):
            arrays = _random_shard(rng, n, latent_shape, extra_shape)
            info.shards.append(writer.write(shard_file(name, k), name, arrays))
            parts.append(arrays)
        expected[name] = {f: np.concatenate([p[f] for p in parts]) for f in parts[0]}
        buckets.append(info)
    manifest = Manifest("video", 16, "float16", ENCODERS, [8.0], fields, buckets)
    writer.finish(manifest)
    return manifest, expected


def test_round_trip_is_exact_and_readable_without_megagen(tmp_path):
    rng = np.random.default_rng(0)
    _, expected = _write_random_dataset(tmp_path / "ds", rng, {(4, 8, 8): [3, 2], (1, 16, 16): [4]})
    reader = ShardReader(tmp_path / "ds", verify="checksum")
    assert reader.num_samples("t4_h8_w8") == 5 and reader.num_samples("t1_h16_w16") == 4
    assert reader.sample_shapes("t1_h16_w16")["lowres"] == (4, 8, 8)
    for name, exp in expected.items():
        for i in range(reader.num_samples(name)):
            sample = reader.read(name, i)
            assert sample.keys() == exp.keys()
            for f, a in sample.items():
                assert isinstance(a, np.ndarray) and a.dtype == exp[f].dtype, (name, i, f)
                assert np.array_equal(a, exp[f][i]) and not a.flags.writeable, (name, i, f)
        ids = [reader.num_samples(name) - 1, 0, 1]
        batch = reader.read_batch(name, ids)
        for f, a in batch.items():
            assert np.array_equal(a, exp[f][ids]) and a.flags.writeable
    # the shard files are standard safetensors: the reference implementation reads them unchanged
    raw = safetensors.numpy.load_file(str(tmp_path / "ds" / "t4_h8_w8" / "shard-00001.safetensors"))
    assert np.array_equal(raw["latents"], expected["t4_h8_w8"]["latents"][3:])
    assert json.loads((tmp_path / "ds" / MANIFEST_NAME).read_text())["format"] == FORMAT_NAME

    model = reader.to_model_batch(reader.read_batch("t4_h8_w8", [0, 4]))
    assert model["latents"].dtype == torch.float32 and model["latents"].shape == (2, 16, 4, 8, 8)
    assert torch.equal(model["latents"], torch.from_numpy(expected["t4_h8_w8"]["latents"][[0, 4]]).float())
    lens = expected["t4_h8_w8"]["text_len.ul2"][[0, 4]]
    assert model["text_valid.ul2"].dtype == torch.bool
    assert model["text_valid.ul2"].sum(1).tolist() == lens.tolist()
    assert model["text.byt5"].dtype == torch.float32 and model["caption_id"].dtype == torch.int64
    assert model["fps"].dtype == torch.float32 and model["lowres"].dtype == torch.float32
    assert not any(k.startswith("text_len.") for k in model)
    one = reader.to_model_batch(reader.read("t4_h8_w8", 2))  # a single sample gains the batch dim
    assert one["latents"].shape == (1, 16, 4, 8, 8)


def test_reader_pickles_paths_and_offsets_only(tmp_path):
    synth(tmp_path / "ds", samples=12, shard_mb=0.02)
    reader = ShardReader(tmp_path / "ds")
    before = reader.read_batch("t4_h8_w8", [0, 3])
    assert reader._views  # maps are open in this process...
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._views == {}  # ...but never travel
    after = clone.read_batch("t4_h8_w8", [0, 3])
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_synth_splits_buckets_into_few_shards_with_learnable_classes(tmp_path):
    res = synth(tmp_path / "ds", samples=60, shard_mb=0.05, seed=3, classes=4)
    m = load_manifest(tmp_path / "ds")
    assert [b.name for b in m.buckets] == ["t1_h16_w16", "t4_h8_w8", "t8_h8_w12"]
    assert m.text_encoders["ul2"].dim == 24 and m.latent_dtype == "float16"
    reader = ShardReader(tmp_path / "ds")
    for b in m.buckets:
        sample_bytes = b.bytes / b.samples  # close enough: the header is small
        expected = -(-b.samples * sample_bytes // (0.05 * 2**20))
        assert 1 < len(b.shards) <= expected + 1 and len(b.shards) < b.samples
        assert max(s.samples for s in b.shards) - min(s.samples for s in b.shards) <= 1
        batch = reader.read_batch(b.name, range(b.samples))
        for i in range(b.samples):  # every sample is exactly its class's pattern
            cls = int(batch["caption_id"][i])
            ref = class_latent(3, cls, b.latent_shape).astype(np.float16)
            assert np.array_equal(batch["latents"][i], ref)
        # same class → same text; the class pattern is the same function in every bucket
        assert len(set(batch["caption_id"].tolist())) > 1
    a = class_latent(3, 1, (16, 1, 8, 8))
    b = class_latent(3, 1, (16, 4, 8, 8))
    assert np.corrcoef(a[:, 0].ravel(), b[:, 0].ravel())[0, 1] > 0.9
    assert len(res.written) == sum(len(b.shards) for b in m.buckets)


def test_plan_shards_is_even_and_minimal():
    assert plan_shards(10, 100, 1000) == [(0, 10)]
    assert plan_shards(10, 100, 250) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert plan_shards(3, 1000, 10) == [(0, 1), (1, 2), (2, 3)]  # a sample larger than the target
    assert plan_shards(0, 1, 1) == []
    assert tokens_per_sample((16, 32, 96, 96)) == 73_728
    assert parse_bucket_list("t4_h8_w8, t1_h16_w16,t4_h8_w8") == [(4, 8, 8), (1, 16, 16)]
    with pytest.raises(ValueError, match="t<T>_h<H>_w<W>"):
        parse_bucket_list("4x8x8")


def _make_source(src, rng, shapes, encoders=(("ul2", 6), ("byt5", 4)), extra=False):
    """A pack source dir: latents of the given (C, T, H, W) / (C, H, W) shapes, text of random lengths."""
    os.makedirs(src / "lat")
    os.makedirs(src / "txt")
    lines, arrays = [], []
    for i, shape in enumerate(shapes):
        lat = rng.standard_normal(shape).astype(np.float32)
        if i % 2:
            safetensors.numpy.save_file({"latents": lat}, str(src / "lat" / f"{i}.safetensors"))
            lat_file = f"lat/{i}.safetensors"
        else:
            np.save(src / "lat" / f"{i}.npy", lat)
            lat_file = f"lat/{i}.npy"
        text = {}
        for enc, dim in encoders:
            emb = rng.standard_normal((int(rng.integers(1, 7)), dim)).astype(np.float32)
            np.save(src / "txt" / f"{enc}-{i}.npy", emb)
            text[enc] = emb
        rec = {
            "id": f"s{i}",
            "latent": lat_file,
            "text": {e: f"txt/{e}-{i}.npy" for e, _ in encoders},
            "fps": 24.0 if len(shape) == 4 else 0.0,
            "duration": 2.5,
            "caption_id": 100 + i,
        }
        if extra:
            np.save(src / "txt" / f"x-{i}.npy", np.full(3, i, dtype=np.int16))
            rec["fields"] = {"score": f"txt/x-{i}.npy"}
        lines.append(json.dumps(rec))
        arrays.append((lat, text))
    (src / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return arrays


def test_pack_round_trip_buckets_by_shape(tmp_path):
    rng = np.random.default_rng(1)
    shapes = [(16, 2, 4, 6), (16, 4, 4), (16, 2, 4, 6), (16, 1, 4, 4), (16, 2, 4, 6)]
    src = _make_source(tmp_path / "src", rng, shapes, extra=True)
    res = pack(tmp_path / "src", tmp_path / "ds", max_len="ul2=8")
    m = res.manifest
    assert [(b.name, b.samples) for b in m.buckets] == [("t1_h4_w4", 2), ("t2_h4_w6", 3)]
    assert m.text_encoders["ul2"].max_len == 8 and m.text_encoders["byt5"].max_len <= 6
    assert m.fields["score"] == FieldInfo("int16", (3,)) and m.fps_values == [0.0, 24.0]
    reader = ShardReader(tmp_path / "ds", verify="checksum")
    members = {"t1_h4_w4": [1, 3], "t2_h4_w6": [0, 2, 4]}  # file order within a bucket
    for name, idx in members.items():
        for j, i in enumerate(idx):
            s = reader.read(name, j)
            lat = src[i][0] if src[i][0].ndim == 4 else src[i][0][:, None]
            assert np.array_equal(s["latents"], lat.astype(np.float16))
            for enc, emb in src[i][1].items():
                assert s[f"text_len.{enc}"] == len(emb)
                assert np.array_equal(s[f"text.{enc}"][: len(emb)], emb.astype(np.float16))
                assert not s[f"text.{enc}"][len(emb) :].any()
            assert s["caption_id"] == 100 + i and s["score"].tolist() == [i] * 3


def test_pack_bucket_rules_crop_and_drop(tmp_path):
    rng = np.random.default_rng(2)
    src = _make_source(tmp_path / "src", rng, [(16, 4, 8, 8), (16, 5, 10, 8), (16, 1, 8, 8), (16, 2, 2, 2)])
    with pytest.raises(DataError, match="sample s3.*fits none of the buckets"):
        pack(tmp_path / "src", tmp_path / "ds", buckets="t4_h8_w8,t1_h8_w8")
    res = pack(tmp_path / "src", tmp_path / "ds", buckets="t4_h8_w8,t1_h8_w8", drop_unfit=True)
    assert res.dropped == ["s3"]
    assert [(b.name, b.samples) for b in res.manifest.buckets] == [("t1_h8_w8", 1), ("t4_h8_w8", 2)]
    cropped = ShardReader(tmp_path / "ds").read("t4_h8_w8", 1)["latents"]
    assert np.array_equal(cropped, src[1][0][:, :4, 1:9, :].astype(np.float16))  # leading frames, centred


def test_interrupted_pack_resumes_without_rewriting_finished_shards(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    _make_source(tmp_path / "src", rng, [(16, 2, 8, 8)] * 8 + [(16, 1, 8, 8)] * 3)
    kwargs = dict(shard_mb=0.01)  # ~4 KB per sample → one shard per 2 samples
    pack(tmp_path / "src", tmp_path / "ref", **kwargs)  # uninterrupted reference

    real, calls = shard_writer.write_shard, []

    def crashing(path, arrays, metadata):
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated crash")
        calls.append(path)
        return real(path, arrays, metadata)

    monkeypatch.setattr(shard_writer, "write_shard", crashing)
    with pytest.raises(KeyboardInterrupt):
        pack(tmp_path / "src", tmp_path / "ds", **kwargs)
    out = tmp_path / "ds"
    assert not (out / MANIFEST_NAME).exists() and (out / PROGRESS_NAME).exists()
    with pytest.raises(DataError, match="unfinished"):
        ShardReader(out)
    finished = {p: os.stat(p).st_mtime_ns for p in calls}
    assert len(finished) == 3

    monkeypatch.setattr(shard_writer, "write_shard", real)
    res = pack(tmp_path / "src", out, **kwargs)
    assert len(res.reused) == 3 and all(os.stat(p).st_mtime_ns == t for p, t in finished.items())
    assert {os.path.join(out, f) for f in res.reused} == set(finished)
    ref = load_manifest(tmp_path / "ref")
    assert load_manifest(out).to_dict() == ref.to_dict()  # same files, same checksums
    assert sum(len(b.shards) for b in ref.buckets) == len(res.reused) + len(res.written) > 3

    again = pack(tmp_path / "src", out, **kwargs)  # a finished pack rerun rewrites nothing
    assert again.written == [] and len(again.reused) == len(res.reused) + len(res.written)


def test_writers_refuse_foreign_or_different_datasets_without_overwrite(tmp_path):
    _make_source(tmp_path / "src", np.random.default_rng(4), [(16, 1, 4, 4)])
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        pack(tmp_path / "src", tmp_path / "ds")
    synth(tmp_path / "syn", samples=6, buckets="t1_h8_w8,t2_h8_w8")
    with pytest.raises(DataError, match="different dataset.*--overwrite"):
        pack(tmp_path / "src", tmp_path / "syn")
    res = pack(tmp_path / "src", tmp_path / "syn", overwrite=True)
    assert [b.name for b in res.manifest.buckets] == ["t1_h4_w4"]
    assert sorted(os.listdir(tmp_path / "syn")) == [
        PROGRESS_NAME,
        MANIFEST_NAME,
        "t1_h4_w4",
    ]  # old shards gone
    assert check_dataset(tmp_path / "syn") == []


def test_manifest_other_version_or_format_is_rejected_naming_the_file(tmp_path):
    synth(tmp_path / "ds", samples=3)
    path = tmp_path / "ds" / MANIFEST_NAME
    good = json.loads(path.read_text())
    for change, match in (
        ({"version": 2}, "version 2 .written by a newer megagen"),
        ({"version": 0}, "format version 0"),
        ({"format": "webdataset"}, "not a megagen latent-shard dataset"),
    ):
        path.write_text(json.dumps({**good, **change}))
        with pytest.raises(DataError, match=match) as err:
            ShardReader(tmp_path / "ds")
        assert str(path) in str(err.value)
