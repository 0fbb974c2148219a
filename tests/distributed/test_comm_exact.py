"""Bytes counted per mesh axis in one training step equal closed forms from the model's shape.

Tiny video preset, one micro-batch of B samples, S video tokens, width d, L layers, Lc text tokens.
Per-rank payload convention (parallel/comm.py): all-gather = output bytes, reduce-scatter and
all-to-all = input bytes, all-reduce = tensor bytes. fp32 everywhere (f = 4 bytes).
"""

from __future__ import annotations

import math

import pytest

from megagen.config import load_config
from megagen.parallel.overlap_schedule import overlap_on
from megagen.specs import get_spec
from tests.distributed.cases_parity import BASE, EXAMPLE

pytestmark = pytest.mark.slow

F = 4
B = 2  # micro-batch; global batch = B × dp so each step is one micro-batch


def shapes(overrides=()):
    cfg = load_config(EXAMPLE, [*BASE, *overrides])
    spec = get_spec("video")
    arch = spec.arch(cfg)
    c, t, h, w = spec.latent_shape(cfg)
    s = (t // 1) * (h // 2) * (w // 2)
    lc = len(arch.text_encoders) * cfg.data.text_tokens
    model = spec.build(cfg)
    return arch, s, lc, model


def tp_sharded_numel(arch) -> int:
    """Per layer: 4 self-attn + 4 cross-attn d×d projections, and W1, W3, W2 (d×ffn)."""
    return arch.layers * (8 * arch.dim**2 + 3 * arch.dim * arch.ffn)


def fsdp_unit_bytes(params, world: int) -> int:
    """FSDP2 pads each parameter's dim 0 to a multiple of the shard-group size."""
    total = 0
    for p in params:
        rows = p.shape[0] if p.dim() else 1
        rest = math.prod(p.shape[1:]) if p.dim() > 1 else 1
        total += math.ceil(rows / world) * world * rest * F
    return total


def fsdp_expected(model, world: int) -> dict:
    """Blocks: all-gather in forward and again in backward (reshard after forward); root: once.
    Every unit reduce-scatters its padded gradient once."""
    blocks = list(model.blocks)
    block_ids = {id(p) for b in blocks for p in b.parameters()}
    root = [p for p in model.parameters() if id(p) not in block_ids]
    per_block = [fsdp_unit_bytes(list(b.parameters()), world) for b in blocks]
    root_bytes = fsdp_unit_bytes(root, world)
    return {
        "all_gather": {"bytes": 2 * sum(per_block) + root_bytes, "calls": 2 * len(blocks) + 1},
        "reduce_scatter": {"bytes": sum(per_block) + root_bytes, "calls": len(blocks) + 1},
    }


WORLD_SCALARS = {"all_reduce": {"bytes": 16, "calls": 2}}  # grad-norm² and loss, float64


def run(dist_pool, overrides):
    results = dist_pool(2).run("tests.distributed.cases_parity:comm_of_one_step", overrides=overrides)
    assert all(r == results[0] for r in results), "ranks counted different traffic"
    return results[0]


def test_tensor_parallel_with_sequence_parallel(dist_pool):
    arch, s, lc, model = shapes()
    got = run(dist_pool, ["parallel.tp=2", "parallel.dp_shard=1", f"train.global_batch_size={B}"])
    act = B * s * arch.dim * F  # one (B, S, d) activation, full sequence
    per_layer = 6  # 3 region gathers + 3 row-parallel reduce-scatters, mirrored in backward
    replicated = sum(p.numel() for p in model.parameters()) - tp_sharded_numel(arch)
    assert got["tp"] == {
        "all_gather": {"bytes": arch.layers * per_layer * act, "calls": arch.layers * per_layer},
        "reduce_scatter": {"bytes": arch.layers * per_layer * act, "calls": arch.layers * per_layer},
        "all_reduce": {"bytes": replicated * F, "calls": 1},  # SP partial grads of replicated params
    }
    assert got["world"] == WORLD_SCALARS
    assert set(got) == {"tp", "world"}


def test_tensor_parallel_without_sequence_parallel(dist_pool):
    arch, s, lc, model = shapes()
    got = run(
        dist_pool,
        [
            "parallel.tp=2",
            "parallel.sequence_parallel=false",
            "parallel.dp_shard=1",
            f"train.global_batch_size={B}",
        ],
    )
    act, ctx = B * s * arch.dim * F, B * lc * arch.dim * F
    # forward: 3 row-parallel all-reduces; backward: 3 region-input all-reduces + the text context's
    assert got["tp"] == {"all_reduce": {"bytes": arch.layers * (6 * act + ctx), "calls": arch.layers * 7}}
    assert set(got) == {"tp", "world"}


@pytest.mark.parametrize("kind", ["allgather_kv", "ulysses"])
def test_context_parallel(dist_pool, kind):
    arch, s, lc, model = shapes()
    got = run(dist_pool, ["parallel.cp=2", f"parallel.cp_kind={kind}", f"train.global_batch_size={B}"])
    full = B * s * arch.dim * F  # K or V over the whole sequence (all local heads)
    # parallel.overlap (auto: off on this CPU) stacks K/V, and Ulysses' q/k/v, into one collective each
    stacked = overlap_on(load_config(EXAMPLE, BASE).parallel.overlap, "cpu")
    if kind == "allgather_kv":
        calls = arch.layers * (1 if stacked else 2)
        assert got["cp"] == {
            "all_gather": {"bytes": arch.layers * 2 * full, "calls": calls},  # K, V forward
            "reduce_scatter": {"bytes": arch.layers * 2 * full, "calls": calls},  # dK, dV
        }
    else:
        # q, k, v and the output each way, on the local half of the sequence
        calls = arch.layers * (4 if stacked else 8)
        assert got["cp"] == {"all_to_all": {"bytes": arch.layers * 8 * full // 2, "calls": calls}}
    # parameters are replicated over cp, so FSDP shards over dp_shard×cp = 2 ranks
    assert got["dp_shard_cp"] == fsdp_expected(model, 2)
    assert got["world"] == WORLD_SCALARS


def test_fsdp(dist_pool):
    arch, s, lc, model = shapes()
    got = run(dist_pool, [f"train.global_batch_size={2 * B}"])
    assert got["dp_shard_cp"] == fsdp_expected(model, 2)
    assert set(got) == {"dp_shard_cp", "world"}
