"""parallel.overlap: the tp-partial gradient all-reduce bucketed and launched in backward
(`grad_reduction.BucketedPartialSum`) gives bitwise the gradients and parameters of the all-reduce after
backward (`sum_partial`, parallel.overlap=false), with sequence parallelism, QK-norm and accumulation."""

from __future__ import annotations

import pytest
import torch

QK = "model.qk_norm=true"
# tiny model, 2 tp ranks, dp = 1: the global batch of 8 runs as 4 accumulated micro-batches of 2; on 4
# ranks FSDP shards over the other 2, and the buckets hold its shards (FSDP2 runs their hooks)
CASES = {
    (2, "tp2+sp"): ["parallel.tp=2"],
    (2, "tp2+sp-qknorm"): [QK, "parallel.tp=2"],
    (2, "tp2-qknorm-no-sp"): [QK, "parallel.tp=2", "parallel.sequence_parallel=false"],
    (2, "tp2+sp-every-micro"): [
        "parallel.tp=2",
        "parallel.grad_sync=every_micro",
        "train.micro_batch_size=4",
    ],
    (4, "fsdp2xtp2+sp-qknorm"): [QK, "parallel.tp=2"],
    (4, "fsdp2xtp2+sp-every-micro"): [
        "parallel.tp=2",
        "parallel.grad_sync=every_micro",
        "train.micro_batch_size=2",
    ],
    (4, "hsdp2xtp2+sp"): ["parallel.tp=2", "parallel.dp_replicate=2", "parallel.dp_shard=1"],
}


@pytest.mark.slow
@pytest.mark.parametrize(("world", "name"), list(CASES), ids=[n for _, n in CASES])
def test_bucketed_partial_sum_is_bitwise_the_sum_after_backward(dist_pool, world, name):
    results = dist_pool(world).run(
        "tests.distributed.cases_overlap:overlap_on_and_off", overrides=CASES[(world, name)], bucket_bytes=64
    )
    off, on = results[0]["false"], results[0]["true"]
    assert off["buckets"] is None and on["buckets"] > 1, name  # the switch picks the path
    assert on["launched_in_backward"] > 0, f"{name}: no bucket was launched during backward"
    assert on["losses"] == off["losses"] and on["grad_norms"] == off["grad_norms"], name
    for what in ("params", "grads"):
        assert on[what].keys() == off[what].keys()
        for key, value in off[what].items():
            assert torch.equal(on[what][key], value), f"{name}: {what} {key} differs"


# TP + SP with overlap: token-wise regions (MLP, cross-attention) run in sequence pieces whose all-gather /
# reduce-scatter hide behind the other pieces' GEMMs (parallel/sp_pipeline.py); self-attention runs its
# q/k/v GEMMs on the local rows under the gather (parallel/sp_local_first.py). Same math on other GEMM
# shapes, so parity with one process (test_parity.py tolerance) and a small, reported drift from overlap
# off.
PADDED_76 = [
    "data.latent_frames=5",
    "data.latent_height=6",
    "data.latent_width=10",
]  # 75 tokens, padded to 76
TP_CASES = {
    (2, "tp2+sp"): ["parallel.tp=2"],
    (2, "tp2+sp-padded-qknorm"): [QK, "parallel.tp=2", *PADDED_76],
    (2, "tp2+sp-every-micro"): [
        "parallel.tp=2",
        "parallel.grad_sync=every_micro",
        "train.micro_batch_size=4",
    ],
    (2, "tp2+sp-full-recompute"): ["parallel.tp=2", "train.recompute=full"],
    (2, "tp2+sp-selective-recompute"): ["parallel.tp=2", "train.recompute=selective"],
    (4, "fsdp2xtp2+sp"): ["parallel.tp=2"],
    (4, "cp2xtp2+sp"): ["parallel.cp=2", "parallel.tp=2", "parallel.dp_shard=1"],
    (4, "audio-fsdp2xtp2+sp"): ["model.spec=audio", "data.latent_frames=20", "parallel.tp=2"],
    (4, "upsampler-fsdp2xtp2+sp"): ["model.spec=upsampler", "parallel.tp=2"],
    (4, "wan-cp2xtp2+sp"): ["model.spec=wan", "parallel.cp=2", "parallel.tp=2", "parallel.dp_shard=1"],
}


@pytest.mark.slow
@pytest.mark.parametrize(("world", "name"), list(TP_CASES), ids=[n for _, n in TP_CASES])
def test_tp_sequence_pieces_match_one_process(dist_pool, world, name):
    from tests.distributed.test_parity import WORST, assert_parity, reference
    from tests.norms import rel_diff

    overrides = TP_CASES[(world, name)]
    on = dist_pool(world).run(
        "tests.distributed.cases_overlap:tp_pipelined", overrides=overrides, overlap=True
    )
    assert on[0]["pipelined_calls"] > 0 and max(on[0]["pieces"]) > 1, f"{name}: nothing ran in pieces"
    assert on[0]["local_first_linears"] == [3], f"{name}: self-attention q/k/v not run local-first"
    for rank, r in enumerate(on):
        assert r["losses"] == on[0]["losses"], f"{name}: rank {rank} logged a different loss"
    assert_parity(on[0], reference(overrides), name)
    off = dist_pool(world).run(
        "tests.distributed.cases_overlap:tp_pipelined", overrides=overrides, overlap=False
    )
    assert off[0]["pipelined_calls"] == 0 and not off[0]["local_first_linears"], f"{name}: overlap off"
    drift = max(rel_diff(on[0][k][p], t) for k in ("params", "grads") for p, t in off[0][k].items())
    print(
        f"\n{name}: pieces {on[0]['pieces']}, worst relative difference from one process {WORST[name]:.2e}, "
        f"from overlap off {drift:.2e}"
    )


@pytest.mark.slow
def test_tp_overlap_moves_the_same_bytes_in_more_calls(dist_pool):
    """At the benchmark's 1K tokens the default rule pipelines (no floor lowered): tp bytes per kind are
    unchanged by the pieces, so the planner's byte counts stay exact; only the call counts grow."""
    tokens_1k = ["data.latent_frames=8", "data.latent_height=32", "data.latent_width=32"]
    comm = {
        flag: dist_pool(2).run(
            "tests.distributed.cases_parity:comm_of_one_step",
            overrides=[*tokens_1k, "parallel.tp=2", f"parallel.overlap={flag}"],
        )[0]["tp"]
        for flag in ("false", "true")
    }
    off, on = comm["false"], comm["true"]
    assert {k: v["bytes"] for k, v in on.items()} == {k: v["bytes"] for k, v in off.items()}
    for kind in ("all_gather", "reduce_scatter"):
        assert on[kind]["calls"] > off[kind]["calls"], (kind, on[kind], off[kind])
