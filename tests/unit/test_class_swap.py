"""The engine's wrappers are class swaps: names and state-dict keys unchanged, `print(model)` shows them."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from megagen.parallel.class_swap import swap_in, swap_out
from megagen.parallel.precision import Autocast, autocast_forward
from megagen.parallel.recompute import Recomputed, apply_recompute
from megagen.parallel.sequence import SequenceSharded, SequenceSharder


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, tokens, token_valid=None):
        self.seen_mask = token_valid
        for block in self.blocks:
            tokens = block(tokens)
        return tokens


def test_wrapped_model_keeps_names_and_shows_what_runs():
    model = Model()
    keys = list(model.state_dict())
    apply_recompute(model, "blocks", "full", layers=1)
    SequenceSharder(2, 1, {"tokens": 1}, "token_valid").install(model)
    autocast_forward(model, "bf16", torch.device("cpu"))
    assert list(model.state_dict()) == keys
    assert isinstance(model, Autocast) and isinstance(model, SequenceSharded) and isinstance(model, Model)
    text = repr(model)
    assert text.startswith("AutocastSequenceShardedModel(") and "autocast=bfloat16" in text
    assert "(0): RecomputedBlock(\n      recompute=full" in text and "(1): Block(" in text
    twin = copy.deepcopy(model)
    assert type(twin) is type(model) and isinstance(twin.blocks[0], Recomputed)


def test_padding_passes_the_mask_of_real_tokens_and_is_refused_without_one():
    model = Model()
    SequenceSharder(2, 1, {"tokens": 1}, "token_valid").install(model)
    out = model(tokens=torch.randn(1, 3, 4))
    assert out.shape == (1, 2, 4)
    assert torch.equal(model.seen_mask, torch.arange(4) < 3)
    model(tokens=torch.randn(1, 4, 4))
    assert model.seen_mask is None  # nothing padded, nothing to mask
    bare = Model()
    SequenceSharder(2, 0, {"tokens": 1}).install(bare)
    with pytest.raises(ValueError, match="token_mask"):
        bare(tokens=torch.randn(1, 3, 4))


def test_swap_out_restores_and_refuses_under_a_later_swap():
    block = Block()
    swap_in(block, Recomputed)
    swap_out(block, Recomputed)
    assert type(block) is Block
    swap_in(block, Recomputed)
    swap_in(block, Autocast)
    with pytest.raises(ValueError, match="another wrapper"):
        swap_out(block, Recomputed)
    patched = Block()
    patched.forward = lambda x: x
    with pytest.raises(ValueError, match="instance"):
        swap_in(patched, Recomputed)
