"""A bad launch is refused before any step, on every rank, naming the rank at fault."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_config_differing_on_one_rank_is_refused(dist_pool):
    msgs = dist_pool(2).run(
        "tests.distributed.cases_parity:preflight_case", overrides_by_rank={1: ["optim.lr=0.5"]}
    )
    for msg in msgs:
        assert "pre-flight check failed" in msg and "resolved config differs" in msg and "rank(s) [1]" in msg


def test_unreachable_data_path_on_one_rank_is_refused(dist_pool, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    missing = str(tmp_path / "elsewhere")
    # rank 0 sees its path; rank 1's config names a path that does not exist on its "node"
    msgs = dist_pool(2).run(
        "tests.distributed.cases_parity:preflight_case",
        overrides_by_rank={0: [f"eval.path={data}"], 1: [f"eval.path={missing}"]},
    )
    for msg in msgs:
        assert "rank 1" in msg and f"cannot see {missing}" in msg


def test_sound_launch_passes(dist_pool):
    assert dist_pool(2).run("tests.distributed.cases_parity:preflight_case", overrides_by_rank={}) == ["", ""]
