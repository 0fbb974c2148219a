"""The bucket sampler: one bucket per step for all ranks, exact epochs, mesh-independent resume."""

from collections import Counter

import pytest

from megagen.config import ConfigError
from megagen.data.sampler import BucketPlan, BucketSampler, RequestPlan

BUCKETS = [
    BucketPlan("t1_h16_w16", size=96, global_batch=16, micro_batch=4),  # image bucket: large batches
    BucketPlan("t4_h8_w8", size=40, global_batch=8, micro_batch=2),
    BucketPlan("t8_h8_w8", size=21, global_batch=4, micro_batch=1),
]


def global_batches(sampler, steps):
    return [sampler.next_global_batch() for _ in range(steps)]


def test_every_dp_rank_draws_the_same_bucket_and_disjoint_slices():
    for dp in (1, 2, 4):
        plans = [list(RequestPlan(BucketSampler(BUCKETS, seed=3), 30, r, dp)) for r in range(dp)]
        ref = global_batches(BucketSampler(BUCKETS, seed=3), 30)
        for step, bucket, ids in ref:
            per_rank = [[q for q in p if q.step == step] for p in plans]
            assert all(q.bucket == bucket for reqs in per_rank for q in reqs)
            got = sorted(i for reqs in per_rank for q in reqs for i in q.sample_ids)
            assert got == sorted(ids), f"dp={dp} step {step}: ranks do not partition the global batch"
            positions = sorted(p for reqs in per_rank for q in reqs for p in q.positions)
            assert positions == list(range(len(ids)))


def test_per_bucket_micro_batch_and_accumulation():
    plan = RequestPlan(BucketSampler(BUCKETS, seed=0), 40, 0, 2)
    for q in plan:
        b = next(b for b in BUCKETS if b.name == q.bucket)
        assert len(q.sample_ids) == b.micro_batch
        assert q.accumulation == b.global_batch // (b.micro_batch * 2)


def test_epoch_covers_each_sample_once_except_the_tail():
    sampler = BucketSampler(BUCKETS, seed=7)
    seen = {b.name: Counter() for b in BUCKETS}
    for _ in range(200):
        state = sampler.state_dict()
        _, bucket, ids = sampler.next_global_batch()
        if sampler.state["buckets"][bucket]["epoch"] == state["buckets"][bucket]["epoch"] == 0:
            seen[bucket].update(ids)
    for b in BUCKETS:
        counts = seen[b.name]
        assert max(counts.values()) == 1, f"{b.name}: a sample repeated within an epoch"
        assert len(counts) == (b.size // b.global_batch) * b.global_batch  # tail = size mod global


def test_buckets_drawn_by_share_of_steps():
    sampler = BucketSampler(BUCKETS, seed=1)
    counts = Counter(sampler.bucket_of_step(s) for s in range(3000))
    expected = {b.name: b.size // b.global_batch for b in BUCKETS}
    total = sum(expected.values())
    for name, n in expected.items():
        assert abs(counts[name] / 3000 - n / total) < 0.04


def test_configured_weights():
    sampler = BucketSampler(BUCKETS, seed=1, weights={"t4_h8_w8": 1.0})
    assert {sampler.bucket_of_step(s) for s in range(200)} == {"t4_h8_w8"}
    with pytest.raises(ConfigError, match="data.bucket_weights"):
        BucketSampler(BUCKETS, seed=1, weights={"nope": 1.0})


def test_resume_at_dp4_continues_at_dp2_with_the_same_global_batches():
    straight = global_batches(BucketSampler(BUCKETS, seed=5), 20)
    first = RequestPlan(BucketSampler(BUCKETS, seed=5), 8, dp_rank=0, dp_size=4)
    state = first.state_after(8)
    resumed = BucketSampler(BUCKETS, seed=5)
    resumed.load_state_dict(state)
    plans = [list(RequestPlan(_restored(state), 12, r, 2)) for r in range(2)]
    for step, _bucket, ids in straight[8:]:
        got = sorted(i for p in plans for q in p if q.step == step for i in q.sample_ids)
        assert got == sorted(ids)
    assert resumed.next_global_batch() == straight[8]


def _restored(state):
    s = BucketSampler(BUCKETS, seed=5)
    s.load_state_dict(state)
    return s


def test_bad_batch_sizes_name_the_key():
    with pytest.raises(ConfigError, match="data.bucket_batch.t8_h8_w8"):
        BucketSampler([BucketPlan("t8_h8_w8", 3, 4, 1)], seed=0)
    sampler = BucketSampler(BUCKETS, seed=0)
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        sampler.accumulation("t4_h8_w8", 3)
