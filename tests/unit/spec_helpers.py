"""Helpers shared by the spec tests: random weights, a random batch of a spec's sample shapes, a config
check that must name its key, and a 2-step training run from synthetic shards per loader (torch and DALI
must give the same losses)."""

from __future__ import annotations

import pytest
import torch

from megagen.config import ConfigError, load_config
from megagen.specs import get_spec

_TRAINED: dict[str, dict[str, list[float]]] = {}


def randomized(model, seed=0):
    """Every parameter random (so outputs are not the zero-initialised v̂ = 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def make_batch(spec, cfg, b=2, seed=1):
    """A batch of `b` random samples of the spec's sample shapes for this config."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn((b, *s), generator=gen) for k, s in spec.sample_shapes(cfg).items()}


def assert_validate_names_the_key(spec_name: str, cfg, override: str, key: str) -> None:
    """Setting `override` ("group.name=<int>") on `cfg` makes the spec's `validate` raise a ConfigError
    naming `key`."""
    k, v = override.split("=")
    group, name = k.split(".")
    setattr(getattr(cfg, group), name, int(v))
    with pytest.raises(ConfigError) as info:
        get_spec(spec_name).validate(cfg)
    assert info.value.key == key


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
