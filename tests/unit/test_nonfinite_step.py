"""`train.nonfinite`: a step whose loss or gradient norm is NaN/inf never replaces good state.

`stop` (default) raises before the step's update and checkpoint; `skip_step` drops the update only.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the cases live in tests.distributed


def run_poisoned(*args, **kwargs) -> dict:
    from tests.distributed.cases_nonfinite import run_poisoned

    return run_poisoned(*args, **kwargs)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_diverging_run_exits_non_zero_and_keeps_only_good_checkpoints(tmp_path, capsys):
    """The issue's case: a huge lr makes the loss non-finite from step 2; the run must stop there, exit
    non-zero with one line naming the step, and leave step 1's checkpoint (finite) as the latest."""
    from megagen.checkpoint.export import load_checkpoint_weights
    from megagen.checkpoint.layout import complete_checkpoints, read_latest
    from megagen.cli import main

    rc = main(
        [
            "train",
            "examples/configs/video_tiny.yaml",
            f"run.dir={tmp_path}",
            "metrics.progress=none",
            "metrics.tensorboard=false",
            "train.steps=4",
            "optim.lr=1e30",
            "optim.warmup_steps=0",
            "checkpoint.every=1",
            "checkpoint.keep=2",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1, err
    assert err[-1].startswith("megagen: train.nonfinite=stop: step 2: loss "), err
    ckpts = complete_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in ckpts] == ["step-000001"], ckpts
    assert read_latest(tmp_path / "checkpoints") == ckpts[0]
    weights, _ = load_checkpoint_weights(ckpts[0])
    assert weights and all(bool(torch.isfinite(t).all()) for t in weights.values())


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_stop_raises_before_the_update_naming_the_step(tmp_path, kind):
    got = run_poisoned(["train.steps=5"], steps=[3], kind=kind, run_dir=str(tmp_path))
    assert got["error"] is not None and got["error"].startswith("train.nonfinite=stop: step 3: loss "), got
    if kind == "grad":  # the loss is finite, the gradient norm is not
        assert "grad_norm inf" in got["error"] or "grad_norm nan" in got["error"], got["error"]
        assert "loss nan" not in got["error"], got["error"]
    assert got["steps_done"] == 2 and len(got["history"]) == 2  # step 3 logged nothing, ran no hook
    assert got["finite"] and _same(got["last"], got["snapshots"][2])  # the weights of step 2, untouched
    assert got["adam_steps"] == [2]


def test_skip_step_drops_only_the_poisoned_update(tmp_path):
    ref = run_poisoned(["train.steps=4"], steps=[], run_dir=str(tmp_path / "ref"))
    got = run_poisoned(
        ["train.steps=4", "train.nonfinite=skip_step"], steps=[2], run_dir=str(tmp_path / "run")
    )
    assert got["error"] is None and got["steps_done"] == 4 and got["finite"]
    snaps = got["snapshots"]
    assert _same(snaps[1], ref["snapshots"][1])  # step 1 trained as usual
    assert _same(snaps[2], snaps[1])  # step 2's update was dropped
    assert not _same(snaps[3], snaps[2]) and not _same(snaps[4], snaps[3])  # later steps train
    assert got["adam_steps"] == [3]  # AdamW counted the 3 updates only
    losses = [r["loss"] for r in got["history"]]
    assert math.isfinite(losses[0]) and math.isnan(losses[1]) and all(map(math.isfinite, losses[2:]))
    assert [r.get("skipped_steps", 0) for r in got["history"]] == [0, 1, 1, 1]
    # the step counter, data and schedule advance: step 3 sees the lr and samples of step 3
    assert [r["lr"] for r in got["history"]] == [r["lr"] for r in ref["history"]]
    assert got["history"][0]["loss"] == ref["history"][0]["loss"]


def test_too_many_skipped_steps_in_a_row_stop_the_run(tmp_path):
    overrides = ["train.steps=8", "train.nonfinite=skip_step", "train.max_skipped_steps=2"]
    got = run_poisoned(overrides, steps=[2, 4, 5, 6, 7, 8], run_dir=str(tmp_path))
    assert got["error"] is not None, got["history"]
    assert got["error"].startswith("train.nonfinite=skip_step: step 6: "), got["error"]
    assert "3 steps in a row" in got["error"] and "train.max_skipped_steps=2" in got["error"]
    assert got["steps_done"] == 5 and got["adam_steps"] == [2] and got["finite"]  # steps 1 and 3 trained
    assert [r.get("skipped_steps", 0) for r in got["history"]] == [0, 1, 1, 2, 3]
