"""Training from latent shards: both loaders (DALI with each source), one process and fsdp2×cp2, same losses
step for step."""

from __future__ import annotations

import pytest

from megagen.data.loaders import dali_available
from megagen.data.synth import synth
from tests.distributed.cases_data import train_from_shards

pytestmark = pytest.mark.slow

LOADERS = ["torch"] + (["dali"] if dali_available() else [])
BUCKETS = [
    "data.bucket_batch={t1_h16_w16: {global: 8, micro: 2}, t4_h8_w8: {global: 4, micro: 1}, "
    "t8_h8_w12: {global: 4, micro: 1}}"
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "ds"
    synth(out, preset="video_tiny", samples=96, seed=0)
    return str(out)


EVAL = ["eval.every=2", "eval.samples=3", "eval.micro_batch_size=2"]


@pytest.fixture(scope="module")
def reference(dataset):
    return train_from_shards(
        dataset, ["data.loader=torch", "data.num_workers=0", *BUCKETS, *EVAL, f"eval.path={dataset}"]
    )


ONE_PROCESS = [["data.loader=torch"]] + (
    [["data.loader=dali"], ["data.loader=dali", "data.dali_source=workers"]] if dali_available() else []
)


@pytest.mark.parametrize("loader", ONE_PROCESS, ids=lambda o: " ".join(o))
def test_one_process_loaders_agree(dataset, reference, loader):
    got = train_from_shards(dataset, [*loader, "data.num_workers=1", *BUCKETS])
    assert got["samples"] == reference["samples"]
    for a, b in zip(got["losses"], reference["losses"]):
        assert a == pytest.approx(b, rel=1e-6)


@pytest.mark.parametrize("loader", LOADERS)
def test_fsdp2_cp2_matches_one_process(dist_pool, dataset, reference, loader):
    overrides = [
        "parallel.cp=2",
        f"data.loader={loader}",
        "data.num_workers=1",
        *BUCKETS,
        *EVAL,
        f"eval.path={dataset}",
    ]
    case = "tests.distributed.cases_data:train_from_shards"
    results = dist_pool(4).run(case, path=dataset, overrides=overrides)
    for r in results:
        assert r["losses"] == results[0]["losses"]
    for a, b in zip(results[0]["losses"], reference["losses"]):
        assert a == pytest.approx(b, rel=1e-5)
    # held-out loss: fixed t grid and noise, so it is the same number on any mesh
    assert [bool(e) for e in reference["evals"]] == [False, True, False, True]
    assert set(reference["evals"][1]) == {
        "eval_loss",
        "eval_loss/t1_h16_w16",
        "eval_loss/t4_h8_w8",
        "eval_loss/t8_h8_w12",
    }
    for got, ref in zip(results[0]["evals"], reference["evals"]):
        for key, value in ref.items():
            assert got[key] == pytest.approx(value, rel=1e-5), key
    # every rank draws the same bucket each step; ranks of one cp group read the same samples
    by_dp = {}
    for r in results:
        by_dp.setdefault(r["coords"]["dp"], []).append(r["samples"])
    for dp_rank, streams in by_dp.items():
        assert all(s == streams[0] for s in streams), f"cp group of dp rank {dp_rank} read different samples"
    buckets_per_step = {}
    for r in results:
        for step, bucket, _ in r["samples"]:
            buckets_per_step.setdefault(step, set()).add(bucket)
    assert all(len(b) == 1 for b in buckets_per_step.values())
    # the dp ranks together read exactly the one-process samples of each step
    ref_ids = sorted((s, b, i) for s, b, ids in reference["samples"] for i in ids)
    got_ids = sorted((s, b, i) for streams in by_dp.values() for s, b, ids in streams[0] for i in ids)
    assert got_ids == ref_ids


def test_a_bad_shard_stops_every_rank_with_one_message(dist_pool, dataset, tmp_path):
    """data.verify=size shared over 4 ranks: the rank whose share holds the truncated shard finds it, and
    every rank raises the same one-line error (printed once for the job)."""
    import os
    import shutil

    from megagen.data.shard_reader import ShardReader

    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy)
    manifest = ShardReader(copy, verify="none").manifest
    paths = [os.path.join(copy, *s.file.split("/")) for b in manifest.buckets for s in b.shards]
    victim = paths[2]  # rank 2's share of 4
    with open(victim, "r+b") as fh:
        fh.truncate(64)
    results = dist_pool(4).run("tests.distributed.cases_data:verify_shared", path=str(copy), mode="size")
    assert all(r == results[0] for r in results)
    assert results[0]["file"] == victim and not results[0]["rank_local"]
    assert "truncated" in results[0]["error"] and "found by rank 2" in results[0]["error"]
    clean = dist_pool(4).run("tests.distributed.cases_data:verify_shared", path=str(dataset), mode="checksum")
    assert clean == [{"error": None}] * 4
