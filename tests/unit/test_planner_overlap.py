"""The planner's overlap model (parallel/planner/overlap_model.py): each rule hides its collective behind
its compute with `parallel.overlap` on, never below zero, not at all without compute, with the chunk
counts the engine's schedule functions give; search keeps overlap on only where it is faster."""

from __future__ import annotations

from dataclasses import replace

import pytest

from megagen.parallel.planner import overlap_exchanges, overlap_model
from megagen.parallel.planner.cluster import load_cluster
from megagen.parallel.planner.comm_cost import tp_partial_rank0_numel
from megagen.parallel.planner.overlap_model import (
    RULES,
    exposure,
    fsdp_exposed,
    pipelined_exposed,
)
from megagen.parallel.planner.plan_point import PlanPoint
from megagen.parallel.planner.reference import LLAMA3, decoder_lm_workload
from megagen.parallel.planner.search import search
from megagen.parallel.planner.step_cost import step_cost

EXAMPLE = "examples/configs/video_tiny.yaml"

# one plan per rule, and the rule it exercises (the tiny video spec on the cpu preset)
RULE_PLANS = {
    "cp_kv_gather": PlanPoint(cp=2, overlap=True),
    "cp_dkv_scatter": PlanPoint(cp=2, overlap=True),
    "ulysses_chunks": PlanPoint(cp=2, cp_kind="ulysses", overlap=True),
    "sp_pieces": PlanPoint(tp=2, overlap=True),
    "sp_local_first": PlanPoint(tp=2, overlap=True),
}


LONG_TOKENS = 8192
"""Long enough that the engine's schedule rules pipeline the tiny spec: 4 Ulysses head groups at cp2 on a
GPU cluster (each group's message clears overlap_schedule.MIN_GROUP_ELEMENTS; 1 on CPU) and 4 SP pieces at
tp2."""


def _video_tiny(tokens: int | None = None):
    from megagen.config import load_config
    from megagen.plan_cli import latent_for_tokens
    from megagen.planning import workload_for_config

    cfg = load_config(EXAMPLE, [])
    if tokens:
        cfg.data.latent_frames, cfg.data.latent_height, cfg.data.latent_width = latent_for_tokens(tokens)
    return workload_for_config(cfg)


@pytest.fixture()
def video_tiny():
    """A fresh workload per test: its cost cache must not outlive a monkeypatched chunk count."""
    return _video_tiny(LONG_TOKENS)


@pytest.fixture()
def video_short():
    """The example's own 64 tokens: too short for the schedule rules to pipeline anything but FSDP."""
    return _video_tiny()


@pytest.fixture(scope="module")
def cpu():
    return load_cluster("cpu")


@pytest.mark.parametrize("rule", RULE_PLANS)
def test_each_rule_lowers_its_axis_and_never_below_zero(video_tiny, cpu, rule):
    plan = RULE_PLANS[rule]
    # the CPU all-to-all is not pipelined (overlap_schedule.NO_PIPELINE_DEVICES): Ulysses' rule on a GPU
    cluster = load_cluster("h100") if rule == "ulysses_chunks" else cpu
    on = step_cost(video_tiny, plan, cluster)
    off = step_cost(video_tiny, replace(plan, overlap=False), cluster)
    axis = RULES[rule].axis
    seen = exposure(video_tiny, plan, cluster, on.comm_s, on.compute_s)
    assert seen.hidden_by_rule[rule] > 0
    assert 0.0 <= on.exposed_by_axis[axis] < on.comm_s[axis]
    assert on.exposed_by_axis[axis] < off.exposed_by_axis[axis]
    assert all(v >= 0.0 for v in on.exposed_by_axis.values())
    assert on.step_s < off.step_s


def test_tp_partial_gradient_buckets_hide_all_but_the_last(monkeypatch):
    """A Llama-3 8B at tp2+SP without FSDP: its replicated embeddings' partial gradients (~GBs) go in
    many buckets, all but the last hidden behind backward."""
    work = decoder_lm_workload(**LLAMA3["8b"], seq=4096)
    plan = PlanPoint(tp=2, overlap=True, param_dtype="bf16")
    h100 = load_cluster("h100")
    on = step_cost(work, plan, h100)
    off = step_cost(work, replace(plan, overlap=False), h100)
    assert on.exposed_by_axis["tp"] < off.exposed_by_axis["tp"]
    hidden = exposure(work, plan, h100, on.comm_s, on.compute_s).hidden_by_rule
    assert 0.0 < hidden["grad_buckets"] < on.comm_s["tp"]
    # one bucket (everything arrives at the end of backward): nothing hides
    monkeypatch.setattr(overlap_model, "BUCKET_BYTES", 2**50)
    assert "grad_buckets" not in exposure(work, plan, h100, on.comm_s, on.compute_s).hidden_by_rule
    # with FSDP the buckets hold shards, and the root unit's (the embeddings') arrive at the very end:
    # only buckets the blocks' norm weights fill can hide
    fsdp = replace(plan, dp_shard=2)
    block_bytes = tp_partial_rank0_numel(work, 2, 2, True, blocks_only=True) * 4
    assert 0 < block_bytes < tp_partial_rank0_numel(work, 2, 2, True) * 4 // 100
    monkeypatch.setattr(overlap_model, "BUCKET_BYTES", block_bytes + 1)  # the blocks fill no bucket
    assert "grad_buckets" not in exposure(work, fsdp, h100, on.comm_s, on.compute_s).hidden_by_rule
    monkeypatch.setattr(overlap_model, "BUCKET_BYTES", block_bytes // 4)  # they fill four
    fsdp_on = step_cost(work, fsdp, h100)
    fsdp_hidden = exposure(work, fsdp, h100, fsdp_on.comm_s, fsdp_on.compute_s).hidden_by_rule["grad_buckets"]
    unsharded = exposure(work, plan, h100, on.comm_s, on.compute_s).hidden_by_rule["grad_buckets"]
    assert 0.0 < fsdp_hidden < unsharded


@pytest.mark.parametrize("rule", [*RULE_PLANS, "grad_buckets"])
def test_without_compute_nothing_hides(video_tiny, cpu, rule):
    plan = RULE_PLANS.get(rule, PlanPoint(tp=2, overlap=True))
    cost = step_cost(video_tiny, plan, cpu)
    instant = replace(cpu, peak_flops=float("inf"))  # every compute takes 0 s
    seen = exposure(video_tiny, plan, instant, cost.comm_s, 0.0)
    axis = RULES[rule].axis
    assert seen.by_axis[axis] == pytest.approx(cost.comm_s[axis], rel=1e-12)
    assert seen.hidden_by_rule.get(rule, 0.0) == pytest.approx(0.0, abs=1e-15)


def test_pipelined_exposure_bounds():
    assert pipelined_exposed(3.0, 1.0, 100.0, 1) == 4.0  # one chunk: nothing overlaps
    assert pipelined_exposed(3.0, 1.0, 100.0, 4) == pytest.approx(1.0)  # first send + last return
    assert pipelined_exposed(3.0, 1.0, 0.0, 4) == pytest.approx(4.0)  # nothing to hide behind
    for compute in (0.0, 0.5, 2.0, 10.0):
        for chunks in (1, 2, 3, 8):
            exposed = pipelined_exposed(3.0, 1.0, compute, chunks)
            assert 4.0 / chunks - 1e-12 <= exposed <= 4.0 + 1e-12


@pytest.mark.parametrize(
    "rule, plan, setting",
    [
        ("ulysses_chunks", RULE_PLANS["ulysses_chunks"], "ulysses_head_chunks"),
        ("sp_pieces", RULE_PLANS["sp_pieces"], "sp_pieces"),
    ],
)
def test_chunk_counts_come_from_the_schedule_functions(video_tiny, cpu, monkeypatch, rule, plan, setting):
    seen = {}
    for chunks in (1, 4):
        video_tiny.__dict__.pop("_cost_cache", None)
        monkeypatch.setattr(overlap_exchanges, setting, lambda *args, n=chunks: n)
        cost = step_cost(video_tiny, plan, cpu)
        seen[chunks] = exposure(video_tiny, plan, cpu, cost.comm_s, cost.compute_s)
        assert cost.overlap_chunks[rule] == chunks
    assert seen[1].hidden_by_rule[rule] == 0.0  # one chunk: the pipeline has nothing to overlap
    assert seen[4].hidden_by_rule[rule] > 0.0


@pytest.mark.parametrize("cluster_name", ["cpu", "h100"])
@pytest.mark.parametrize("tokens", [None, LONG_TOKENS])
def test_chunk_counts_are_what_the_engine_asks_for(cluster_name, tokens):
    """The engine's arguments: Ulysses (local heads after tp, cp, the rank's sequence chunk, head dim, the
    device type) and SP (the rank's sequence shard, the region input's width, tp)."""
    cluster = load_cluster(cluster_name)
    work = _video_tiny(tokens)
    s_cp = work.tokens // 2
    heads, width = work.heads, work.layer_items(0)[2][0].width
    ulysses = step_cost(work, RULE_PLANS["ulysses_chunks"], cluster).overlap_chunks["ulysses_chunks"]
    expected = overlap_exchanges.ulysses_head_chunks(heads, 2, s_cp, width // heads, cluster.device_type)
    assert ulysses == expected
    if tokens and cluster.device_type == "cuda":
        assert ulysses == 4  # the long sequence does pipeline where the rule allows it
    sp = step_cost(work, RULE_PLANS["sp_pieces"], cluster).overlap_chunks["sp_pieces"]
    assert sp == overlap_exchanges.sp_pieces(work.tokens // 2, work.hidden, 2)


def test_overlap_off_is_the_unoverlapped_model(video_tiny, cpu):
    """Off: TP/CP axes fully exposed, FSDP hidden except its edge units (the model before overlap)."""
    plan = PlanPoint(tp=2, cp=2, dp_shard=2)
    cost = step_cost(video_tiny, plan, cpu)
    fsdp_s = cost.comm_s["dp_shard_cp"]
    assert cost.exposed_by_axis["tp"] == cost.comm_s["tp"] and cost.exposed_by_axis["cp"] == cost.comm_s["cp"]
    assert cost.overlap_chunks == {}
    rest = sum(t for a, t in cost.comm_s.items() if a != "dp_shard_cp")
    assert cost.exposed_comm_s == rest + fsdp_exposed(fsdp_s, cost.compute_s, video_tiny.layers)


def test_search_keeps_overlap_only_where_it_is_faster(video_short, cpu):
    ranked = search(video_short, 4, 8, cpu, top=50)
    assert any(r.plan.overlap for r in ranked)
    for r in ranked:
        twin = step_cost(video_short, replace(r.plan, overlap=not r.plan.overlap), cpu)
        assert r.cost.step_s < twin.step_s if r.plan.overlap else r.cost.step_s <= twin.step_s
        assert ("overlap" in r.plan.label()) == r.plan.overlap
