"""The engine's sharded RMSNorm in one process (its multi-rank numbers: tests/distributed/test_wan_parity.py)
and the start-up check of a plan's `sharded_norms`."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from megagen.config import load_config
from megagen.parallel.plan_check import plan_problems
from megagen.parallel.sharded_norm import sharded_rms_norm
from megagen.specs import get_spec


def test_one_slice_is_the_plain_rms_norm_forward_and_backward():
    x = torch.randn(2, 5, 24, requires_grad=True)  # fp32: the norm computes in fp32, as rms_norm_reference
    w = torch.randn(24, requires_grad=True)
    mine = sharded_rms_norm(x, w, 1e-6, None, 24)  # no process group: the sum over ranks is this rank's
    ref = F.rms_norm(x, (24,), w, 1e-6)
    assert torch.allclose(mine, ref, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(ref)
    gx, gw = torch.autograd.grad(mine, (x, w), g)
    rx, rw = torch.autograd.grad(ref, (x, w), g)
    assert torch.allclose(gx, rx, rtol=1e-5, atol=1e-6) and torch.allclose(gw, rw, rtol=1e-5, atol=1e-6)


def _wan_tiny():
    cfg = load_config("examples/configs/wan_tiny.yaml", [])
    spec = get_spec("wan")
    with torch.device("meta"):
        return spec.build(cfg), spec.parallel_plan(cfg)


def test_plan_check_names_a_sharded_norm_outside_every_region_or_matching_nothing():
    model, plan = _wan_tiny()
    bad = dataclasses.replace(plan, sharded_norms=("blocks.*.cross_norm", "blocks.*.nothing"))
    problems, _ = plan_problems(model, bad, tp=2)
    assert any("sharded norm 'blocks.*.cross_norm'" in p and "inside no region" in p for p in problems)
    assert any("'blocks.*.nothing' matches no module" in p for p in problems)


def test_plan_check_refuses_a_tp_that_does_not_divide_the_norm_width():
    model, plan = _wan_tiny()
    _, sizes = plan_problems(model, plan, tp=3)
    assert any("does not divide the width (64) of sharded norm" in p for p in sizes)
