"""Helpers shared by the data tests: a small shard dataset whose values identify their samples, request
plans over it and batch comparisons (the loader tests), and the tiny-video training config and dataset the
data-path training tests start from."""

from __future__ import annotations

import numpy as np
import torch

from megagen.config import load_config
from megagen.data.contract import MicroBatchRequest
from megagen.data.manifest import BucketInfo, Manifest, TextEncoderInfo, standard_fields
from megagen.data.sampler import BucketPlan, BucketSampler, RequestPlan
from megagen.data.shard_format import shard_file
from megagen.data.shard_reader import ShardReader
from megagen.data.shard_writer import DatasetWriter

# ---------------------------------------------------------------------------------------------- loaders
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


def read_directly(path, plan):
    """Every request of `plan` read directly, one by one, from a fresh reader: what a loader must yield."""
    reader = ShardReader(path)
    return [(r, reader.to_model_batch(reader.read_batch(r.bucket, list(r.sample_ids)))) for r in plan]


def skip_plan():
    """Requests over t2_h2_w4 that draw sample 2 (the bad one of the error datasets) in every pattern."""
    bucket = "t2_h2_w4"
    return [
        MicroBatchRequest(0, 0, bucket, (1, 2, 3), (0, 1, 2), 2),
        MicroBatchRequest(0, 1, bucket, (2,), (3,), 2),  # every sample bad
        MicroBatchRequest(1, 0, bucket, (4, 0), (0, 1), 1),
    ]


# --------------------------------------------------------------------------------- training on shards
TINY_CONFIG = "examples/configs/video_tiny.yaml"
TINY_BUCKET = "t4_h8_w8"


def tiny_config(*overrides):
    """The tiny video config with 0 loader workers and batches of 4 in micro-batches of 2."""
    return load_config(
        TINY_CONFIG,
        ["data.num_workers=0", "train.global_batch_size=4", "train.micro_batch_size=2", *overrides],
    )


def tiny_run_config(run_dir, *overrides):
    """`tiny_config` writing its run into `run_dir`, quietly (no progress bar, no TensorBoard)."""
    return tiny_config(f"run.dir={run_dir}", "metrics.progress=none", "metrics.tensorboard=false", *overrides)


def synth_tiny(out, samples=24):
    """A seeded synthetic video_tiny dataset in one bucket (`TINY_BUCKET`)."""
    from megagen.data.synth import synth

    synth(out, preset="video_tiny", samples=samples, seed=0, buckets=TINY_BUCKET)
    return out


def local_data(cfg, steps):
    """`build_data` for one CPU process: sampler, request plan, loader and reader of `cfg`."""
    from megagen.data.pipeline import build_data
    from megagen.parallel.runtime import LocalRuntime
    from megagen.specs import get_spec

    return build_data(cfg, get_spec(cfg.model.spec), LocalRuntime(torch.device("cpu")), steps)
