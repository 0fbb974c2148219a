"""The data plan is O(1): building it, resuming it at a far step and asking for any request visit no step in
between, and the sample order keeps its guarantees (checked against a step-by-step reference)."""

import pickle
import random
import time
import tracemalloc

import numpy as np
import pytest

from megagen.config import ConfigError
from megagen.data.sampler import BucketPlan, BucketSampler, RequestPlan, SyntheticSampler

BUCKETS = [
    BucketPlan("t1_h16_w16", size=96, global_batch=16, micro_batch=4),
    BucketPlan("t4_h8_w8", size=40, global_batch=8, micro_batch=2),
    BucketPlan("t8_h8_w8", size=21, global_batch=4, micro_batch=1),
]
# 100 M samples in 5 buckets, Movie Gen-like batch sizes (images large, long videos small)
HUGE = [
    BucketPlan(f"t{t}_h{h}_w{w}", size=20_000_000, global_batch=g, micro_batch=m)
    for (t, h, w, g, m) in [
        (1, 32, 32, 1024, 16),
        (4, 32, 32, 512, 8),
        (8, 32, 48, 256, 4),
        (16, 48, 48, 128, 2),
        (32, 96, 96, 64, 1),
    ]
]


def reference_walk(sampler, steps, origin=None):
    """The sampling rule step by step, as a sampler that stores its state would apply it: the bucket of the
    step, its next `global` samples of the epoch order, a new epoch when fewer than `global` remain."""
    state = origin or {"step": 0, "buckets": {b: {"epoch": 0, "cursor": 0} for b in sampler.buckets}}
    state = {"step": state["step"], "buckets": {k: dict(v) for k, v in state["buckets"].items()}}
    out = []
    for _ in range(steps):
        step = state["step"]
        before = {"step": step, "buckets": {k: dict(v) for k, v in state["buckets"].items()}}
        name = sampler.bucket_of_step(step)
        plan, pos = sampler.buckets[name], state["buckets"][name]
        if pos["cursor"] + plan.global_batch > plan.size:
            pos["epoch"], pos["cursor"] = pos["epoch"] + 1, 0
        order = sampler._permutation(name, pos["epoch"])
        ids = order(range(pos["cursor"], pos["cursor"] + plan.global_batch)).tolist()
        out.append(((step, name, ids), before))
        pos["cursor"] += plan.global_batch
        state["step"] = step + 1
    return out, state


def test_batches_and_states_equal_the_step_by_step_rule():
    sampler = BucketSampler(BUCKETS, seed=2)
    ref, final = reference_walk(sampler, 400)  # ~20 epochs of the small buckets
    for step, (batch, state_before) in enumerate(ref):
        assert sampler.global_batch(step) == batch
        assert sampler.state_at(step) == state_before
    assert sampler.state_at(400) == final


def test_resume_with_other_batch_sizes_continues_each_bucket_from_its_cursor():
    first = BucketSampler(BUCKETS, seed=4)
    state = first.state_at(37)
    regrouped = [BucketPlan(b.name, b.size, b.global_batch // 2, 1) for b in BUCKETS]  # cursors now off-grid
    resumed = BucketSampler(regrouped, seed=4, weights={"t1_h16_w16": 1, "t8_h8_w8": 3})
    resumed.load_state_dict(state)
    ref, final = reference_walk(resumed, 300, origin=state)
    for batch, state_before in ref:
        assert resumed.global_batch(batch[0]) == batch
        assert resumed.state_at(batch[0]) == state_before
    assert resumed.state_at(37 + 300) == final
    assert final["buckets"]["t4_h8_w8"] == state["buckets"]["t4_h8_w8"]  # weight 0: never drawn


def test_every_bucket_epoch_is_a_permutation():
    sampler = BucketSampler(BUCKETS, seed=9)
    seen = {}
    for step in range(600):
        name, draw = sampler.draw(step)
        epoch, _ = sampler._position(name, draw)
        seen.setdefault((name, epoch), []).extend(sampler.global_batch(step)[2])
    for (name, epoch), ids in seen.items():
        plan = sampler.buckets[name]
        assert len(ids) == len(set(ids)), f"{name} epoch {epoch}: a sample repeated"
        assert set(ids) <= set(range(plan.size))
        if (name, epoch + 1) in seen:  # a finished epoch: every sample but the tail
            assert len(ids) == plan.size // plan.global_batch * plan.global_batch
    assert max(e for _, e in seen) >= 10


def test_a_global_batch_depends_only_on_seed_and_step():
    straight = BucketSampler(BUCKETS, seed=5)
    for origin in (1, 63, 64, 65, 200):
        resumed = BucketSampler(BUCKETS, seed=5)
        resumed.load_state_dict(straight.state_at(origin))
        for step in range(origin, origin + 150):
            assert resumed.global_batch(step) == straight.global_batch(step)
        assert resumed.state_at(origin + 150) == straight.state_at(origin + 150)
    assert BucketSampler(BUCKETS, seed=6).global_batch(3) != straight.global_batch(3)


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_plan_indexing_equals_iteration_in_any_order(dp):
    """Mixed accumulation (1, 2 and 4 micro-batches per step at dp 1): the request count is searched."""
    sampler = BucketSampler(BUCKETS, seed=1)
    sampler.load_state_dict(sampler.state_at(50))
    plan = RequestPlan(sampler, 700, dp_rank=dp - 1, dp_size=dp)
    every = list(plan)
    assert len(plan) == len(every)
    assert [(r.step, r.micro) for r in every][:2] == [
        (50, 0),
        (50, 1) if every[0].accumulation > 1 else (51, 0),
    ]
    assert every[-1].step == 749 and every[-1].micro == every[-1].accumulation - 1
    order = list(range(len(every)))
    random.Random(0).shuffle(order)
    for i in order[:400] + list(range(len(every))):
        assert plan[i] == every[i], i
    assert plan[-1] == every[-1] and plan[np.int64(3)] == every[3]
    with pytest.raises(IndexError):
        plan[len(every)]


def test_plan_pickles_and_names_its_buckets():
    plan = RequestPlan(BucketSampler(BUCKETS, seed=1, weights={"t4_h8_w8": 1, "t8_h8_w8": 1}), 90, 0, 2)
    assert plan.micro_sizes() == {"t4_h8_w8": 2, "t8_h8_w8": 1}
    copy = pickle.loads(pickle.dumps(plan))
    assert list(copy) == list(plan) and copy.state_after(90) == plan.state_after(90)


def test_synthetic_plan():
    sampler = SyntheticSampler(global_batch=8, micro_batch=2)
    sampler.load_state_dict({"step": 10**8, "buckets": {}})
    assert sampler.state_at(10**8 + 5) == {"step": 10**8 + 5, "buckets": {}}
    plan = RequestPlan(sampler, 10**9, dp_rank=1, dp_size=2)
    assert len(plan) == 2 * 10**9
    req = plan[3]
    assert (req.step, req.micro, req.positions, req.sample_ids) == (10**8 + 1, 1, (6, 7), (6, 7))
    assert plan.state_after(5) == {"step": 10**8 + 5, "buckets": {}}


def test_resume_at_step_a_million_is_constant_time():
    """State for step 10^6 and requests a billion steps out, computed without visiting the steps between:
    a handful of schedule blocks (64 steps each), well under a megabyte, well under a second."""
    sampler = BucketSampler(HUGE, seed=0)
    tracemalloc.start()
    t0 = time.perf_counter()
    state = sampler.state_at(10**6)
    plan = RequestPlan(sampler, 10**9, dp_rank=3, dp_size=8)
    assert plan.state_after(10**6) == state
    resumed = BucketSampler(HUGE, seed=0)
    resumed.load_state_dict(state)
    tail = RequestPlan(resumed, 10**9 - 10**6, dp_rank=3, dp_size=8)
    first, far = tail[0], tail[len(tail) - 1]
    elapsed = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert first.step == 10**6 and far.step == 10**9 - 1
    assert first == next(iter(tail))
    assert sum(state["buckets"][b.name]["cursor"] > 0 for b in HUGE) == 5
    blocks = sampler.schedule.block.cache_info().misses + resumed.schedule.block.cache_info().misses
    assert blocks < 200, f"{blocks} schedule blocks computed: the plan walked over steps"
    assert peak < 2 * 2**20, f"{peak / 2**20:.1f} MiB traced"
    assert elapsed < 10, f"{elapsed:.1f} s"  # ~0.1 s unloaded; main took minutes for 10^7 steps


def test_bad_sampler_states_name_the_key():
    sampler = BucketSampler(BUCKETS, seed=0)
    state = sampler.state_at(5)
    state["buckets"]["t4_h8_w8"]["cursor"] = -3
    with pytest.raises(ConfigError, match="checkpoint.resume"):
        sampler.load_state_dict(state)
    with pytest.raises(ConfigError, match="data.path"):
        sampler.load_state_dict({"step": 5, "buckets": {}})
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="data.bucket_weights.t4_h8_w8"):
            BucketSampler(BUCKETS, seed=0, weights={"t4_h8_w8": bad})


def test_buckets_with_similar_names_get_their_own_order():
    """Names alike in their first 8 bytes (t16_h48_w48, t16_h48_w64) still key distinct epoch orders."""
    plans = [BucketPlan("t16_h48_w48", 64, 8, 8), BucketPlan("t16_h48_w64", 64, 8, 8)]
    sampler = BucketSampler(plans, seed=0)
    assert sampler.sample_ids("t16_h48_w48", 0, range(64)) != sampler.sample_ids("t16_h48_w64", 0, range(64))
