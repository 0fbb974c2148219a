"""Worker-side cases: train a parity case with the CP overlap forced on or off, and one Ulysses attention
pipelined over head groups against the unpipelined one.

The flag is forced by wrapping the class that parallelize.py builds, so a case can also pin the Ulysses
head-group count (the tiny model's messages are below the rule's threshold, which would pick 1).
"""

from __future__ import annotations

from unittest import mock

import torch
import torch.distributed as dist

from megagen.kernels.attention import AttentionCore
from megagen.parallel.context_parallel import ContextParallelAttention
from tests.distributed.cases_parity import run_training


def run_with_overlap(overrides: list[str], overlap: bool, head_chunks: int | None = None) -> dict:
    def build(inner, kind, group, _overlap=True):
        return ContextParallelAttention(inner, kind, group, overlap, head_chunks)

    run_dir = f"/tmp/megagen-cp-overlap-{int(overlap)}-{head_chunks}"
    with mock.patch("megagen.parallel.parallelize.ContextParallelAttention", build):
        return run_training(overrides, run_dir=run_dir)


def _forward_backward(core, q, k, v, kv_valid) -> list[torch.Tensor]:
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = core(*leaves, kv_valid)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    return [out.detach()] + [x.grad for x in leaves]


def ulysses_pipeline_bitwise(head_chunks: list[int]) -> dict:
    """{(chunks, padded): output and q/k/v grads bitwise equal to overlap off} for one attention call."""
    gen = torch.Generator().manual_seed(dist.get_rank())
    q, k, v = (torch.randn(2, 7, 8, 16, generator=gen) for _ in range(3))
    padded = torch.arange(7 * dist.get_world_size()) < 11
    group = dist.group.WORLD
    result = {}
    for kv_valid in (None, padded):
        want = _forward_backward(
            ContextParallelAttention(AttentionCore(), "ulysses", group), q, k, v, kv_valid
        )
        for chunks in head_chunks:
            core = ContextParallelAttention(AttentionCore(), "ulysses", group, True, chunks)
            got = _forward_backward(core, q, k, v, kv_valid)
            result[(chunks, kv_valid is not None)] = all(torch.equal(a, b) for a, b in zip(got, want))
    return result


def allgather_overlap_error() -> float:
    """Largest relative difference, output and q/k/v grads, of one overlapped all-gather attention against
    the unoverlapped one, on the whole group (with more than one remote chunk when it has > 2 ranks)."""
    from tests.norms import rel_diff

    gen = torch.Generator().manual_seed(dist.get_rank())
    q, k, v = (torch.randn(2, 5, 4, 16, generator=gen) for _ in range(3))
    padded = torch.arange(5 * dist.get_world_size()) < 5 * dist.get_world_size() - 7  # last chunk all pad
    group = dist.group.WORLD
    worst = 0.0
    for kv_valid in (None, padded):
        want = _forward_backward(
            ContextParallelAttention(AttentionCore(), "allgather_kv", group), q, k, v, kv_valid
        )
        core = ContextParallelAttention(AttentionCore(), "allgather_kv", group, True)
        got = _forward_backward(core, q, k, v, kv_valid)
        worst = max([worst, *(rel_diff(a, b) for a, b in zip(got, want))])
    return worst
