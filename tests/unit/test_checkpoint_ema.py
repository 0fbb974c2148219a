"""EMA of the weights (megagen/train/ema.py) and its place in checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from megagen.train.ema import EMA


def test_ema_update_is_the_moving_average():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    ema = EMA(model, decay=0.75)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    for name, p in model.named_parameters():
        expected = torch.lerp(start[name], p.detach(), 0.25)
        assert torch.equal(ema.shadow[name], expected)
        assert torch.allclose(ema.shadow[name], 0.75 * start[name] + 0.25 * p.detach(), atol=1e-6)
    ema.reset_to_weights()
    other = nn.Linear(4, 3)
    ema.copy_to(other)
    assert torch.equal(other.weight, model.weight)


def test_ema_decay_must_be_in_the_open_unit_interval():
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="ema_decay"):
            EMA(nn.Linear(2, 2), bad)


def test_ema_skips_frozen_parameters():
    model = nn.Linear(2, 2)
    model.bias.requires_grad_(False)
    assert list(EMA(model, 0.9).shadow) == ["weight"]
