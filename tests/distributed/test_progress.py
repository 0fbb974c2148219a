"""parallel/progress.py on real process groups: c10d's per-group sequence numbers count every collective
(FSDP2's, megagen's functional ones, plain torch.distributed) exactly as CommCounter does, and a rank
that has not reached a collective has a lower number than the ranks waiting in it."""

from __future__ import annotations

import pytest

CASES = "tests.distributed.cases_progress"
pytestmark = pytest.mark.slow


def test_sequence_numbers_count_every_collective(dist_pool):
    results = dist_pool(4).run(f"{CASES}:counts_match_the_comm_counter")
    for rank, res in enumerate(results):
        delta = {axis: n for axis, n in res["delta"].items() if n}
        assert delta == res["calls"], f"rank {rank}"
        assert delta["dp_shard"] >= 4 and delta["tp"] == 2 and delta["world"] == 1, f"rank {rank}: {delta}"
        assert res["members"]["world"] == [0, 1, 2, 3]
        assert len(res["members"]["tp"]) == 2 and rank in res["members"]["tp"]
        assert res["pending"] is None or res["pending"] == []  # nothing left in flight either way
    for axis in ("dp_shard", "tp", "world"):  # the same count on every rank of a group
        for members in {tuple(res["members"][axis]) for res in results}:
            assert len({results[r]["after"][axis] for r in members}) == 1, (axis, members)


def test_a_late_rank_is_behind(dist_pool):
    results = dist_pool(2).run(f"{CASES}:a_late_rank_has_a_lower_number")
    assert results[0]["during"] == results[1]["during"] + 1
    assert results[0]["after"] == results[1]["after"] == results[0]["during"]
