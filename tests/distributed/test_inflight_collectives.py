"""Several collectives in flight on one gloo group, as the overlapped paths leave them (parallel.overlap).

torch's gloo all-gather corrupts the heap or hangs once more than one is in flight on a group (8 of 8
2-rank streams of up to 100,000 `all_gather_into_tensor` calls with 2-9 pending crashed, most within
20,000), so `collectives.issue_all_gather` sends CPU gathers as an all-to-all. This keeps a sliding window of
gathers, reduce-scatters and all-reduces pending, waits them out of order and checks every result, and
that the accounting still reports the gathers as all_gather with their bytes.
"""

from __future__ import annotations

import pytest


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kinds", "ops"),
    [(["all_gather"], 30000), (["all_gather", "reduce_scatter", "all_reduce"], 6000)],
    ids=["gathers", "mixed"],
)
def test_collectives_in_flight_give_exact_results(dist_pool, kinds, ops):
    results = dist_pool(2).run(
        "tests.distributed.cases_inflight:sliding_window", ops=ops, window=4, kinds=kinds, timeout=240
    )
    for rank, r in enumerate(results):
        assert r["wrong"] == 0, f"rank {rank}: {r['wrong']} of {ops} results wrong"
        expected_calls = sum(1 for i in range(ops) if kinds[i % len(kinds)] == "all_gather")
        assert sum(g["calls"] for g in r["all_gathers"]) == expected_calls, r["all_gathers"]
        assert all(g["bytes"] > 0 for g in r["all_gathers"])
