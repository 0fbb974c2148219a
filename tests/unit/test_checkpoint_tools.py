"""Checkpoint tools in one process: export, averaging, info, the `ckpt` CLI and init_from."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from megagen.checkpoint import (
    CheckpointError,
    GrowthRules,
    attach_checkpointing,
    average_checkpoints,
    export_safetensors,
    init_from_checkpoint,
    load_checkpoint_weights,
    load_weights,
)
from megagen.checkpoint.cli import add_ckpt_commands, checkpoint_info, run_ckpt_command
from megagen.checkpoint.export import read_safetensors, write_safetensors
from megagen.config.errors import UsageError

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the worker cases live in tests.distributed
from tests.distributed.cases_checkpoint import config, train_with_checkpoints  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """4 steps with a checkpoint every 2 (kept: steps 2 and 4) and the trained trainer."""
    d = tmp_path_factory.mktemp("tools")
    out = train_with_checkpoints(
        ["checkpoint.every=2", "checkpoint.keep=0", "train.steps=4"], str(d), keep_trainer=True
    )
    return d / "checkpoints", out["trainer"], out["hook"]


def _ckpt_cli(*argv) -> int:
    parser = argparse.ArgumentParser(prog="megagen")
    add_ckpt_commands(parser.add_subparsers(dest="command"))
    return run_ckpt_command(parser.parse_args(["ckpt", *argv]))


def _sample_inputs(trainer, seed: int = 0, latent=(16, 4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, *latent, generator=g)
    t = torch.rand(2, generator=g)
    batch = {
        f"text.{n}": torch.randn(2, 8, w, generator=g)
        for n, w in trainer.spec.arch(trainer.cfg).text_encoders.items()
    }
    return trainer.spec.model_inputs(batch, x, t, None)


def _fresh_trainer(tmp_path, *overrides):
    from megagen.parallel.runtime import LocalRuntime
    from megagen.train.loop import Trainer

    cfg = config(["run.seed=123", *overrides], str(tmp_path / "fresh"))
    return Trainer(cfg, LocalRuntime())


def test_export_reproduces_the_trained_model_exactly(run, tmp_path, capsys):
    ckpt, trainer, _ = run
    out = tmp_path / "model.safetensors"
    assert _ckpt_cli("export", str(ckpt), str(out)) == 0
    fresh = _fresh_trainer(tmp_path)
    meta = load_weights(fresh.model, out, fresh.cfg)
    assert meta["spec"] == "video" and meta["preset"] == "tiny" and meta["step"] == "4"
    assert json.loads(meta["config"])["train"]["steps"] == 4
    inputs = _sample_inputs(trainer)
    with torch.no_grad():
        assert torch.equal(fresh.model(**inputs), trainer.model(**inputs))
    with pytest.raises(UsageError, match="^error: OUT: .* refusing to overwrite"):  # not a "config error"
        export_safetensors(ckpt, out)


def test_export_ema_weights(run, tmp_path):
    ckpt, _, hook = run
    out = export_safetensors(ckpt, tmp_path / "ema.safetensors", ema=True)
    tensors, meta = read_safetensors(out)
    assert meta["weights"] == "ema"
    for name, shadow in hook.ema.shadow.items():
        assert torch.equal(tensors[name], shadow)


def test_average_is_the_elementwise_mean(run, tmp_path):
    ckpt, _, _ = run
    a, _ = load_checkpoint_weights(ckpt / "step-000002")
    b, _ = load_checkpoint_weights(ckpt / "step-000004")
    out = tmp_path / "avg"
    assert _ckpt_cli("average", str(ckpt / "step-000002"), str(ckpt / "step-000004"), "--out", str(out)) == 0
    avg, meta = load_checkpoint_weights(out)
    assert meta["kind"] == "weights" and meta["averaged_from"][1].endswith("step-000004")
    for name in a:
        assert torch.equal(avg[name], ((a[name].double() + b[name].double()) / 2).float()), name
    weighted = average_checkpoints(
        [ckpt / "step-000002", ckpt / "step-000004"], tmp_path / "w.safetensors", weights=[1.0, 3.0]
    )
    w, _ = read_safetensors(weighted)
    for name in a:
        assert torch.equal(w[name], ((a[name].double() + 3 * b[name].double()) / 4).float()), name
    # The averaged directory is a weights-only checkpoint: init_from and export take it, resume does not.
    fresh = _fresh_trainer(tmp_path)
    report = init_from_checkpoint(fresh.model, out)
    assert not report.missing and not report.unexpected and not report.grown
    assert torch.equal(dict(fresh.model.named_parameters())["pos_t.weight"], avg["pos_t.weight"])
    with pytest.raises(CheckpointError, match="weights only"):
        train_with_checkpoints([f"checkpoint.resume={out}"], str(tmp_path / "r"))


def test_average_refuses_bad_weights(run, tmp_path):
    ckpt, _, _ = run
    with pytest.raises(CheckpointError, match="2 weights for 1"):
        _ckpt_cli("average", str(ckpt), "--out", str(tmp_path / "x"), "--weights", "1,2")


def test_info(run, capsys):
    ckpt, _, _ = run
    info = checkpoint_info(ckpt)
    assert info["step"] == 4 and info["spec"] == "video" and info["preset"] == "tiny"
    assert info["mesh"]["world_size"] == 1
    n = sum(p.numel() for p in run[1].model.parameters())
    assert info["contents"]["model"]["elements"] == n and info["contents"]["ema"]["elements"] == n
    assert info["contents"]["optim"]["elements"] == 2 * n + info["contents"]["optim"]["tensors"] // 3
    assert _ckpt_cli("info", str(ckpt)) == 0
    text = capsys.readouterr().out
    assert "step      4" in text and "preset tiny" in text and "world_size=1" in text


# --------------------------------------------------------------------------------------------- init_from
def test_init_from_extends_position_tables(run, tmp_path, monkeypatch, caplog):
    """A 256 px-shaped checkpoint starts a 768 px-shaped run: old positions give the same outputs."""
    from megagen.specs.video.spec import VIDEO_PRESETS

    big = replace(VIDEO_PRESETS["tiny"], max_latent_thw=(16, 96, 96))
    monkeypatch.setitem(VIDEO_PRESETS, "tiny_768", big)
    ckpt, trainer, _ = run
    size = ["data.latent_height=24", "data.latent_width=24", "train.steps=1"]
    new = _fresh_trainer(
        tmp_path, "model.preset=tiny_768", *size, f"checkpoint.init_from={ckpt}", "run.seed=7"
    )
    with caplog.at_level(logging.INFO, logger="megagen"):
        report = attach_checkpointing(new).init_report
    assert new.step == 0 and not new.optimizer.state  # weights only: fresh optimizer, step 0
    assert set(report.grown) == {"pos_h.weight", "pos_w.weight"}
    assert report.grown["pos_h.weight"][:2] == ((16, 64), (48, 64))
    assert not report.missing and not report.unexpected
    assert "grown pos_h.weight: (16, 64) -> (48, 64)" in caplog.text
    old_p = dict(trainer.model.named_parameters())
    new_p = dict(new.model.named_parameters())
    assert torch.equal(new_p["pos_h.weight"][:16], old_p["pos_h.weight"])
    fresh = _fresh_trainer(tmp_path, "model.preset=tiny_768", *size, "run.seed=7")
    assert torch.equal(new_p["pos_h.weight"][16:], dict(fresh.model.named_parameters())["pos_h.weight"][16:])
    inputs = _sample_inputs(trainer)  # a 4x8x8 latent: positions that existed before
    with torch.no_grad():
        assert torch.equal(new.model(**inputs), trainer.model(**inputs))
        big_inputs = _sample_inputs(new, latent=(16, 4, 24, 24))  # the new run's own shape works
        assert new.model(**big_inputs).shape == (2, 4 * 12 * 12, 64)


class _Toy(nn.Module):
    def __init__(self, inputs: int, extra: bool = False):
        super().__init__()
        self.patch_embed = nn.Linear(inputs, 3)
        self.out = nn.Linear(3, 2)
        if extra:
            self.new_head = nn.Linear(3, 2)


def test_grow_input_features_with_zeros(tmp_path):
    """The upsampler rule: a widened input projection loads the old columns and zeroes the new ones."""
    torch.manual_seed(0)
    old = _Toy(4)
    src = write_safetensors(
        {k: v.detach() for k, v in old.state_dict().items()}, tmp_path / "toy.safetensors", {}
    )
    new = _Toy(6, extra=True)
    report = init_from_checkpoint(new, src, GrowthRules(zero_new_inputs=("patch_embed.weight",)))
    assert report.grown == {"patch_embed.weight": ((3, 4), (3, 6), "zero_inputs")}
    assert report.missing == ["new_head.bias", "new_head.weight"]
    assert torch.equal(new.patch_embed.weight[:, 4:], torch.zeros(3, 2))
    x = torch.randn(5, 4)
    extra = torch.randn(5, 2)
    with torch.no_grad():
        assert torch.equal(new.out(new.patch_embed(torch.cat([x, extra], 1))), old.out(old.patch_embed(x)))


def test_init_from_lists_unexpected_and_refuses_other_shape_changes(tmp_path, caplog):
    torch.manual_seed(0)
    src = write_safetensors(
        {k: v.detach() for k, v in _Toy(4, extra=True).state_dict().items()}, tmp_path / "t.safetensors", {}
    )
    with caplog.at_level(logging.WARNING, logger="megagen"):
        report = init_from_checkpoint(_Toy(4), src)
    assert report.unexpected == ["new_head.bias", "new_head.weight"]
    assert "new_head.weight" in caplog.text
    with pytest.raises(CheckpointError, match=r"patch_embed.weight: saved \(3, 4\), model \(3, 6\)") as err:
        init_from_checkpoint(_Toy(6), src)  # no growth rule for it
    assert err.value.key == "checkpoint.init_from"


def test_upsampler_starts_from_its_text_to_video_parent(run, tmp_path):
    """init_from a video checkpoint into the upsampler: patchify input widened with zeros, tables grown."""
    upsampler = pytest.importorskip("megagen.specs.upsampler.model")
    ckpt, parent, _ = run
    new = _fresh_trainer(tmp_path, "model.spec=upsampler", f"checkpoint.init_from={ckpt}")
    report = attach_checkpointing(new).init_report
    assert report.grown["patch_embed.weight"][2] == "zero_inputs"
    assert not report.missing and not report.unexpected
    fresh = _fresh_trainer(tmp_path, "model.spec=upsampler").model.state_dict()
    expected = upsampler.upsampler_from_parent(parent.model.state_dict(), fresh)
    for name, tensor in new.model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
