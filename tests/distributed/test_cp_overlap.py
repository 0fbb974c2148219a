"""CP overlap on vs off: the overlapped all-gather (online-softmax merge) within 1e-6 of today's path after
one step and 2e-6 after three in fp32, padded and with QK-norm; Ulysses, stacked and pipelined over head
groups, bitwise identical."""

from __future__ import annotations

import pytest
import torch

from tests.norms import rel_diff

pytestmark = pytest.mark.slow

# 3 AdamW steps amplify fp32 reordering: merely reordering the one-process run's own sums moves step-3
# QK-norm gradients by 1.3e-6 (cases_parity.py, LIVE). The merge itself is exact (tests/unit/
# test_cp_overlap_merge.py, 1e-12 in fp64). Largest drift measured with the fused LSE kernels
# (parallel/attention_lse.py): after 1 step 6.8e-7 (cp2-allgather-padded-qknorm) and 7.5e-7
# (cp2xtp2-allgather-padded), within the 1e-6; after these 3 steps 1.22e-6 and 1.57e-6 (q/k weight
# grads; the fp32 reference math it replaced gave 1.01e-6 and 1.92e-6), so the tolerance stays 2e-6.
TOL = 2e-6
PADDED = ["data.latent_frames=3", "data.latent_height=6", "data.latent_width=10"]  # 45 tokens
QK = "model.qk_norm=true"
CASE = "tests.distributed.cases_cp_overlap:run_with_overlap"
ULYSSES = ["parallel.cp=2", "parallel.cp_kind=ulysses"]

CASES = {
    (2, "cp2-allgather-padded-qknorm"): (["parallel.cp=2", QK, *PADDED], TOL),
    (2, "cp2-ulysses-padded-qknorm"): ([*ULYSSES, QK, *PADDED], 0.0),
    (4, "cp2xtp2-allgather-padded"): (
        ["parallel.cp=2", "parallel.tp=2", "parallel.dp_shard=1", *PADDED],
        TOL,
    ),
}


# The tiny model has 8 heads, 4 per rank on cp2: 2 head groups of 2 pipelined (the rule would pick 1 here).
PIPELINED = {
    "cp2-ulysses-2groups": ULYSSES,
    "cp2-ulysses-2groups-padded": [*ULYSSES, *PADDED],
    "cp2-ulysses-2groups-padded-selective-recompute": [*ULYSSES, *PADDED, "train.recompute=selective"],
    "cp2-ulysses-2groups-compiled": [*ULYSSES, "parallel.compile=true", "parallel.compile_backend=aot_eager"],
}


def _compare(on: dict, off: dict, tol: float, name: str) -> float:
    """Assert on vs off within `tol` (bitwise when 0); returns the worst relative difference seen."""
    worst = 0.0
    for kind in ("losses", "grad_norms"):
        for a, b in zip(on[kind], off[kind]):
            worst = max(worst, abs(a - b) / abs(b) if b else abs(a - b))
            assert abs(a - b) <= tol * abs(b), f"{name}: {kind} {a} vs {b}"
    for kind in ("params", "grads"):
        for pname, b in off[kind].items():
            a = on[kind][pname]
            worst = max(worst, rel_diff(a, b))
            if tol == 0.0:
                assert torch.equal(a, b), f"{name}: {kind} {pname} not bitwise"
            else:
                assert rel_diff(a, b) <= tol, f"{name}: {kind} {pname} {rel_diff(a, b):.2e}"
    return worst


@pytest.mark.parametrize(("world", "name"), list(CASES), ids=[n for _, n in CASES])
def test_overlap_on_matches_off(dist_pool, world, name):
    overrides, tol = CASES[(world, name)]
    on = dist_pool(world).run(CASE, overrides=overrides, overlap=True)[0]
    off = dist_pool(world).run(CASE, overrides=overrides, overlap=False)[0]
    assert len(on["losses"]) == 3
    print(f"{name}: worst relative difference on vs off {_compare(on, off, tol, name):.2e}")


ALLGATHER = [key for key in CASES if "allgather" in key[1]]


@pytest.mark.parametrize(("world", "name"), ALLGATHER, ids=[n for _, n in ALLGATHER])
def test_overlapped_allgather_within_1e6_after_one_step(dist_pool, world, name):
    """The issue's bar: losses, gradients and parameters of one step within 1e-6 of the path it replaces."""
    overrides = [*CASES[(world, name)][0], "train.steps=1"]
    on = dist_pool(world).run(CASE, overrides=overrides, overlap=True)[0]
    off = dist_pool(world).run(CASE, overrides=overrides, overlap=False)[0]
    assert len(on["losses"]) == 1
    print(f"{name}: worst relative difference after one step {_compare(on, off, 1e-6, name):.2e}")


@pytest.mark.parametrize("name", list(PIPELINED))
def test_ulysses_head_groups_pipelined_match_off_bitwise(dist_pool, name):
    on = dist_pool(2).run(CASE, overrides=PIPELINED[name], overlap=True, head_chunks=2)[0]
    off = dist_pool(2).run(CASE, overrides=PIPELINED[name], overlap=False)[0]
    assert len(on["losses"]) == 3
    _compare(on, off, 0.0, name)


def test_one_ulysses_attention_pipelined_is_bitwise(dist_pool):
    for rank_result in dist_pool(2).run(
        "tests.distributed.cases_cp_overlap:ulysses_pipeline_bitwise", head_chunks=[1, 2, 4]
    ):
        assert all(rank_result.values()), rank_result


def test_one_overlapped_allgather_attention_on_four_ranks(dist_pool):
    """Three remote chunks (one of them all padding) land in the right reduce-scatter slots."""
    errors = dist_pool(4).run("tests.distributed.cases_cp_overlap:allgather_overlap_error")
    print(f"four ranks: worst relative difference {max(errors):.2e}")
    assert max(errors) <= 1e-6, errors
