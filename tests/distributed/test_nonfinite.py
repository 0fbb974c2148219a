"""`train.nonfinite` on a mesh: a NaN on ONE rank makes every rank take the same decision (the loss and the
gradient norm are global), and the run matches a one-process run with the same step poisoned."""

from __future__ import annotations

import math

import pytest

from tests.distributed.cases_nonfinite import run_poisoned
from tests.norms import rel_diff

pytestmark = pytest.mark.slow

TOL = 1e-5
MESHES = {"fsdp2": [], "cp2": ["parallel.cp=2"]}


def _assert_close(got: dict, ref: dict, what: str) -> None:
    assert got.keys() == ref.keys(), what
    for name, b in ref.items():
        assert rel_diff(got[name], b) <= TOL, f"{what}: {name} rel diff {rel_diff(got[name], b):.2e}"


@pytest.mark.parametrize("mesh", list(MESHES), ids=list(MESHES))
def test_a_nan_on_one_rank_skips_the_step_on_every_rank(dist_pool, tmp_path, mesh):
    overrides = ["train.steps=3", "train.nonfinite=skip_step", *MESHES[mesh]]
    results = dist_pool(2).run(
        "tests.distributed.cases_nonfinite:run_poisoned",
        overrides=overrides,
        steps=[2],
        rank=1,
        run_dir=str(tmp_path / "mesh"),
    )
    ref = run_poisoned(overrides[:2], steps=[2], run_dir=str(tmp_path / "ref"))
    for rank, r in enumerate(results):
        assert r["error"] is None and r["steps_done"] == 3 and r["adam_steps"] == [2], (rank, r["error"])
        assert [h.get("skipped_steps", 0) for h in r["history"]] == [0, 1, 1], rank
    losses, ref_losses = [h["loss"] for h in results[0]["history"]], [h["loss"] for h in ref["history"]]
    assert math.isnan(losses[1]) and math.isnan(ref_losses[1])
    for step in (0, 2):
        assert abs(losses[step] - ref_losses[step]) <= TOL * abs(ref_losses[step]), (step, losses, ref_losses)
    for step, (got, want) in enumerate(zip(results[0]["snapshots"], ref["snapshots"])):
        _assert_close(got, want, f"{mesh}: params after step {step}")


def test_stop_is_raised_on_every_rank_before_the_update(dist_pool, tmp_path):
    results = dist_pool(2).run(
        "tests.distributed.cases_nonfinite:run_poisoned",
        overrides=["train.steps=3"],
        steps=[2],
        rank=0,
        run_dir=str(tmp_path / "mesh"),
    )
    ref = run_poisoned(["train.steps=1"], steps=[], run_dir=str(tmp_path / "ref"))
    for rank, r in enumerate(results):
        assert r["error"] and r["error"].startswith("train.nonfinite=stop: step 2: loss nan"), (rank, r)
        assert r["steps_done"] == 1 and r["adam_steps"] == [1] and r["finite"], rank
    _assert_close(results[0]["last"], ref["last"], "params after the stop")
