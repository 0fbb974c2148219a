"""parallel/sp_pipeline.py: a token-wise body run in sequence pieces equals the plain gather → body →
reduce-scatter (float64, to rounding), and collectives are in flight while pieces compute, forward and
backward."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow
CASE = "tests.distributed.cases_sp_pipeline:pieces_vs_plain"


@pytest.mark.parametrize(("world", "batch", "tokens", "pieces"), [(2, 2, 12, 3), (2, 1, 8, 4), (4, 2, 6, 2)])
def test_pieces_equal_the_plain_path_and_overlap(dist_pool, world, batch, tokens, pieces):
    for rank, r in enumerate(dist_pool(world).run(CASE, batch=batch, tokens_local=tokens, pieces=pieces)):
        assert r["out_diff"] < 1e-12 and max(r["grad_diffs"]) < 1e-12, (rank, r["out_diff"], r["grad_diffs"])
        assert r["piece_shapes"] == [(batch, world * tokens // pieces, 8)] * pieces
        assert r["in_flight_after"] == 0, f"rank {rank}: a collective was never waited"
        forward = [flight for kind, _, flight in r["events"] if kind == "forward"]
        backward = [flight for kind, _, flight in r["events"] if kind == "backward"]
        assert len(forward) == len(backward) == pieces
        # forward: piece i computes under the gather of piece i+1 and the reduce-scatter of piece i-1
        # (first and last: one of them); backward: other pieces' collectives are in flight at every piece
        assert forward[0] == 1 and forward[-1] == 1 and all(f == 2 for f in forward[1:-1]), forward
        assert all(b >= 1 for b in backward), backward


def test_region_with_bias_matches_overlap_off(dist_pool):
    for r in dist_pool(2).run("tests.distributed.cases_sp_pipeline:region_on_and_off"):
        assert r["out"] < 1e-6 and r["grad"] < 1e-6 and r["bias_grad"] < 1e-5, r
        assert "sp_pipelined" in r["repr"], r["repr"]


def test_misdeclared_token_wise_region_is_refused(dist_pool):
    r = dist_pool(2).run("tests.distributed.cases_sp_pipeline:region_errors")[0]
    assert "has 2 row-parallel linears; it needs exactly 1" in r["setup"], r
    assert "must return its row-parallel linear's output as is" in r["call"], r


@pytest.mark.parametrize(("world", "batch", "tokens"), [(2, 2, 5), (4, 1, 3)])
def test_local_first_equals_the_plain_gather(dist_pool, world, batch, tokens):
    for rank, r in enumerate(
        dist_pool(world).run(
            "tests.distributed.cases_sp_pipeline:local_first_vs_plain", batch=batch, tokens_local=tokens
        )
    ):
        assert r["out_diff"] < 1e-12 and r["grad_diff"] < 1e-12, (rank, r)
        # three GEMMs on the local rows under the gather, then three on the remote rows
        assert r["in_flight"] == [1, 1, 1, 0, 0, 0], (rank, r["in_flight"])
        assert r["in_flight_after"] == 0, f"rank {rank}: a collective was never waited"


def test_replicated_context_is_projected_once_per_call(dist_pool):
    for r in dist_pool(2).run("tests.distributed.cases_sp_pipeline:context_projected_once"):
        assert r["k_calls_on"] == 1 and r["diff"] < 1e-6, r
