"""Checkpoints in one process: exact resume, atomic layout, rotation, stale saves, clear errors."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from megagen.checkpoint import CheckpointError, open_checkpoint, preflight, read_latest
from megagen.checkpoint.layout import COMPLETE, LATEST, META
from megagen.config import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the worker cases live in tests.distributed
from tests.distributed.cases_checkpoint import config, train_with_checkpoints  # noqa: E402

ASYNC = ["checkpoint.every=2", "checkpoint.async_save=true"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """8 steps without checkpoints (the reference)."""
    return train_with_checkpoints([], str(tmp_path_factory.mktemp("straight")))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A run stopped after step 4 with async checkpoints every 2 steps: (run dir, checkpoint dir)."""
    run = tmp_path_factory.mktemp("saved")
    train_with_checkpoints(ASYNC, str(run), stop_at=4)
    return run, run / "checkpoints"


def _snapshot(d: Path) -> dict:
    return {
        str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in d.rglob("*") if p.is_file()
    }


def test_exact_resume_is_bit_identical(straight, saved, tmp_path):
    run, _ = saved
    resumed_run = tmp_path / "run"
    shutil.copytree(run, resumed_run)
    resumed = train_with_checkpoints(ASYNC, str(resumed_run))
    assert resumed["start"]["step"] == 4 and resumed["resumed_from"].endswith("step-000004")
    assert resumed["losses"] == straight["losses"][4:]  # bit-identical, steps 5-8
    for kind in ("params", "ema"):
        for name, ref in straight[kind].items():
            assert torch.equal(resumed[kind][name], ref), (kind, name)
    assert resumed["sampler_end"] == straight["sampler_end"]
    seen = {(s, ids) for s, ids in resumed["requests"]}
    assert seen == {(s, ids) for s, ids in straight["requests"] if s >= 4}
    assert read_latest(resumed_run / "checkpoints").name == "step-000008"


def test_layout_latest_and_rotation(saved):
    _, ckpt = saved
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["latest", "step-000002", "step-000004"]
    assert (ckpt / LATEST).read_text().strip() == "step-000004"
    step4, meta = open_checkpoint(ckpt, "checkpoint.resume")
    assert step4.name == "step-000004" and meta["step"] == 4
    assert {"model", "optim", "ema"} <= set(meta["contents"])
    assert meta["spec"] == "video" and meta["preset"] == "tiny" and meta["mesh"]["world_size"] == 1
    assert meta["sampler"] == {"step": 4, "buckets": {}}
    files = set(meta["files"])
    assert {".metadata", "__0_0.distcp", "rng/rank-00000.json"} <= files and COMPLETE not in files


def test_rotation_keeps_the_newest(tmp_path):
    run = tmp_path / "run"
    train_with_checkpoints(["checkpoint.every=1", "checkpoint.keep=2", "train.steps=4"], str(run))
    ckpt = run / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step-000003", "step-000004"]


def test_incomplete_and_stale_saves_are_never_loaded(saved, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(saved[0], run)
    ckpt = run / "checkpoints"
    # A crash mid-save leaves a .tmp dir (even with all files and a marker); a dir without COMPLETE
    # (e.g. copied by hand) is not a checkpoint; `latest` naming it is not trusted.
    shutil.copytree(ckpt / "step-000004", ckpt / "step-000006.tmp-deadbeef")
    shutil.copytree(ckpt / "step-000004", ckpt / "step-000008")
    (ckpt / "step-000008" / COMPLETE).unlink()
    (ckpt / LATEST).write_text("step-000008\n")
    assert read_latest(ckpt).name == "step-000004"
    with pytest.raises(CheckpointError, match="incomplete"):
        open_checkpoint(ckpt / "step-000008", "checkpoint.resume")
    with pytest.raises(CheckpointError, match="incomplete"):
        open_checkpoint(ckpt / "step-000006.tmp-deadbeef", "checkpoint.resume")
    out = train_with_checkpoints([*ASYNC, "train.steps=6"], str(run))
    assert out["start"]["step"] == 4
    assert not any(".tmp-" in p.name for p in ckpt.iterdir())  # cleaned at start
    assert read_latest(ckpt).name == "step-000006"


def test_resume_never_and_explicit_path(saved, tmp_path):
    run, ckpt = saved
    fresh = train_with_checkpoints(["checkpoint.resume=never", "train.steps=1"], str(tmp_path / "a"))
    assert fresh["start"]["step"] == 0
    explicit = train_with_checkpoints(
        [f"checkpoint.resume={ckpt / 'step-000002'}", "train.steps=3"], str(tmp_path / "b")
    )
    assert explicit["start"]["step"] == 2 and explicit["start"]["sampler"]["step"] == 2


# ------------------------------------------------------------------------------------------- errors
def _resume_error(run_dir: Path, *overrides) -> CheckpointError:
    with pytest.raises(CheckpointError) as info:
        train_with_checkpoints([*ASYNC, *overrides], str(run_dir))
    assert isinstance(info.value, ConfigError)
    return info.value


def test_other_preset_is_refused_and_nothing_is_overwritten(saved, monkeypatch):
    from megagen.specs.video.spec import VIDEO_PRESETS

    monkeypatch.setitem(VIDEO_PRESETS, "tiny_wide", replace(VIDEO_PRESETS["tiny"], dim=32, ffn=64))
    run, ckpt = saved
    before = _snapshot(ckpt)
    err = _resume_error(run, "model.preset=tiny_wide")
    assert err.key == "checkpoint.resume" and "'tiny'" in str(err) and "'tiny_wide'" in str(err)
    assert _snapshot(ckpt) == before
    # the same check before any model is built
    with pytest.raises(CheckpointError, match="tiny_wide"):
        preflight(config(["model.preset=tiny_wide"], str(run)))
    assert preflight(config([], str(run))).name == "step-000004"
    assert preflight(config([], str(run.parent / "elsewhere"))) is None


@pytest.mark.parametrize("damage", ["missing shard", "truncated shard", "truncated index", "no manifest"])
def test_damaged_checkpoint_is_named(saved, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(saved[0], run)
    step4 = run / "checkpoints" / "step-000004"
    if damage == "missing shard":
        (step4 / "__0_0.distcp").unlink()
        expected = "shard file __0_0.distcp is missing"
    elif damage == "truncated shard":
        os.truncate(step4 / "__0_0.distcp", 1000)
        expected = "__0_0.distcp is truncated"
    elif damage == "truncated index":
        os.truncate(step4 / ".metadata", 10)
        expected = ".metadata is truncated"
    else:
        (step4 / META).write_text("{not json")
        expected = "megagen.json does not match the checksum in COMPLETE"
    before = _snapshot(run / "checkpoints")
    err = _resume_error(run)
    assert err.key == "checkpoint.resume" and expected in str(err) and "step-000004" in str(err)
    assert _snapshot(run / "checkpoints") == before


def test_missing_resume_path(tmp_path):
    err = _resume_error(tmp_path / "run", f"checkpoint.resume={tmp_path / 'nope'}")
    assert err.key == "checkpoint.resume" and "does not exist" in str(err)


def test_index_with_foreign_code_is_refused(saved):
    from megagen.checkpoint.safe_reader import load_dcp_metadata

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with pytest.raises(CheckpointError, match="refusing to load"):
        load_dcp_metadata(pickle.dumps(Evil()), "checkpoint.resume", "x/.metadata")
    good = (saved[1] / "step-000004" / ".metadata").read_bytes()
    assert "model.pos_t.weight" in load_dcp_metadata(good, "checkpoint.resume", "x").state_dict_metadata


def test_meta_is_json_with_the_resolved_config(saved):
    meta = json.loads((saved[1] / "step-000004" / META).read_text())
    assert meta["config"]["train"]["steps"] == 8 and meta["config"]["checkpoint"]["async_save"] is True
    assert meta["scheduler"]["last_epoch"] == 4 and len(meta["param_groups"]) == 2
