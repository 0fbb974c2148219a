"""The gradient rule (parallel/grad_reduction.py): which gradients are partial over which mesh axis.

Classified from the plan and the module structure: sharded linears are complete over tp, parameters inside
a region (learned QK-norm) are partial over tp with or without SP, everything between regions is partial
over tp only under SP; data axes (dp, cp) are summed by FSDP when it is applied, by the engine otherwise.
"""

from __future__ import annotations

import pytest
import torch

from megagen.config import load_config
from megagen.parallel.grad_reduction import (
    BETWEEN,
    DATA_AXES,
    IN_REGION,
    SHARDED,
    classify,
    engine_reductions,
)
from megagen.specs import get_spec
from tests.unit.test_plan_check import GOOD, Toy

TP2 = {"dp_replicate": 1, "dp_shard": 1, "cp": 1, "tp": 2}


def _video(qk_norm: bool):
    cfg = load_config("examples/configs/video_tiny.yaml", [f"model.qk_norm={str(qk_norm).lower()}"])
    spec = get_spec("video")
    with torch.device("meta"):
        model = spec.build(cfg)
    return model, spec.parallel_plan(cfg)


QK_NORMS = {f"blocks.{i}.{a}.{n}_norm.weight" for i in range(2) for a in ("attn", "cross_attn") for n in "qk"}


def test_toy_classes():
    classes, problems = classify(Toy(), GOOD)
    assert problems == {}
    assert classes["blocks.0.attn.q.weight"] == classes["blocks.0.attn.q.bias"] == SHARDED  # column bias too
    assert classes["blocks.0.attn.o.weight"] == SHARDED
    assert classes["blocks.0.attn.o.bias"] == BETWEEN  # added after the row-parallel reduction
    assert classes["blocks.0.norm.weight"] == classes["embed.weight"] == BETWEEN


def test_qk_norm_weights_are_in_region_and_summed_over_tp_without_sp():
    model, plan = _video(qk_norm=True)
    classes, problems = classify(model, plan)
    assert problems == {}
    assert {n for n, c in classes.items() if c == IN_REGION} == QK_NORMS
    assert set(engine_reductions(model, plan, TP2, False, ())["tp"]) == QK_NORMS
    between = {n for n, c in classes.items() if c == BETWEEN}
    assert "blocks.0.attn_norm.weight" in between and "blocks.0.mod_table" in between
    assert set(engine_reductions(model, plan, TP2, True, ())["tp"]) == QK_NORMS | between


def test_movie_gen_without_qk_norm_sums_nothing_over_tp_without_sp():
    model, plan = _video(qk_norm=False)
    assert not any("_norm" in n and ".attn." in n for n, _ in model.named_parameters())
    assert engine_reductions(model, plan, TP2, False, ()) == {}


def test_data_axes_are_left_to_fsdp_when_it_covers_them():
    model, plan = _video(qk_norm=False)
    sizes = {"dp_replicate": 1, "dp_shard": 1, "cp": 2, "tp": 1}
    assert engine_reductions(model, plan, sizes, False, DATA_AXES) == {}
    everything = [n for n, _ in model.named_parameters()]
    assert engine_reductions(model, plan, sizes, False, ()) == {"cp": everything}


def test_unclassifiable_parameter_stops_parallelisation_when_tp_is_used():
    model = Toy()
    for blk in model.blocks:
        blk.attn.gain = torch.nn.Parameter(torch.ones(8))
    with pytest.raises(ValueError, match="'blocks.0.attn.gain'"):
        engine_reductions(model, GOOD, TP2, False, ())
    assert engine_reductions(model, GOOD, {**TP2, "tp": 1}, False, ()) == {}
