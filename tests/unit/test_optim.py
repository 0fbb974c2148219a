"""Learning-rate schedule shape."""

import pytest

from megagen.config import load_config
from megagen.train.optim import lr_multiplier


def test_warmup_then_cosine_to_min():
    cfg = load_config(None, ["train.steps=110", "optim.warmup_steps=10", "optim.min_lr_ratio=0.1"])
    assert lr_multiplier(0, cfg) == pytest.approx(0.1)
    assert lr_multiplier(9, cfg) == pytest.approx(1.0)
    assert lr_multiplier(10, cfg) == pytest.approx(1.0)
    assert lr_multiplier(60, cfg) == pytest.approx(0.55)
    assert lr_multiplier(110, cfg) == pytest.approx(0.1)
    values = [lr_multiplier(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_constant_and_linear():
    cfg = load_config(None, ["train.steps=20", "optim.warmup_steps=0", "optim.schedule=constant"])
    assert lr_multiplier(15, cfg) == 1.0
    cfg = load_config(
        None, ["train.steps=20", "optim.warmup_steps=0", "optim.schedule=linear", "optim.min_lr_ratio=0"]
    )
    assert lr_multiplier(10, cfg) == pytest.approx(0.5)
