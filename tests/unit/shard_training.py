"""Shared test step: train a spec for 2 steps from synthetic shards with one loader, and check that the
torch and DALI loaders give the same losses (each spec's test calls it once per loader)."""

from __future__ import annotations

import pytest

from megagen.config import load_config

_TRAINED: dict[str, dict[str, list[float]]] = {}


def train_from_synth_shards(tmp_path_factory, preset: str, loader: str, config: str) -> list[float]:
    from megagen.data.loaders import dali_available
    from megagen.data.synth import synth
    from megagen.train import train

    if loader == "dali" and not dali_available():
        pytest.skip("DALI is not installed")
    root = tmp_path_factory.getbasetemp() / f"{preset}_shards"
    if not (root / "manifest.json").exists():
        synth(root, preset=preset, samples=16, classes=4)
    over = [
        f"data.path={root}",
        f"data.loader={loader}",
        "data.num_workers=0",  # DALI's forked python workers can deadlock after torch threads in pytest
        "train.steps=2",
        f"run.dir={tmp_path_factory.mktemp('run')}",
        "metrics.tensorboard=false",
        "metrics.jsonl=false",
        "metrics.progress=none",
    ]
    losses = train(load_config(config, over)).losses
    assert len(losses) == 2 and all(0 < v < 10 for v in losses)
    trained = _TRAINED.setdefault(preset, {})
    trained[loader] = losses
    if len(trained) == 2:
        assert trained["torch"] == pytest.approx(trained["dali"], rel=1e-6)
    return losses
