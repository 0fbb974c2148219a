"""parallel.overlap: the tp-partial gradient all-reduce bucketed and launched in backward
(`grad_reduction.BucketedPartialSum`) gives bitwise the gradients and parameters of the all-reduce after
backward (`sum_partial`, parallel.overlap=false), with sequence parallelism, QK-norm and accumulation."""

from __future__ import annotations

import pytest
import torch

QK = "model.qk_norm=true"
# tiny model, 2 tp ranks, dp = 1: the global batch of 8 runs as 4 accumulated micro-batches of 2
CASES = {
    "tp2+sp": ["parallel.tp=2"],
    "tp2+sp-qknorm": [QK, "parallel.tp=2"],
    "tp2-qknorm-no-sp": [QK, "parallel.tp=2", "parallel.sequence_parallel=false"],
    "tp2+sp-every-micro": ["parallel.tp=2", "parallel.grad_sync=every_micro", "train.micro_batch_size=4"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_bucketed_partial_sum_is_bitwise_the_sum_after_backward(dist_pool, name):
    results = dist_pool(2).run(
        "tests.distributed.cases_overlap:overlap_on_and_off", overrides=CASES[name], bucket_bytes=64
    )
    off, on = results[0]["false"], results[0]["true"]
    assert off["buckets"] is None and on["buckets"] > 1, name  # the switch picks the path
    assert on["launched_in_backward"] > 0, f"{name}: no bucket was launched during backward"
    assert on["losses"] == off["losses"] and on["grad_norms"] == off["grad_norms"], name
    for what in ("params", "grads"):
        assert on[what].keys() == off[what].keys()
        for key, value in off[what].items():
            assert torch.equal(on[what][key], value), f"{name}: {what} {key} differs"
