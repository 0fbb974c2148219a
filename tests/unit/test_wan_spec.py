"""The wan spec: megagen's forward equals diffusers' WanTransformer3DModel (outputs and input gradients), the
objective maps onto Wan's (timestep scale, prediction direction), plan, presets, sampling and data."""

from __future__ import annotations

import math

import pytest
import torch

from megagen.config import load_config
from megagen.diffusion import interpolate, velocity_target
from megagen.parallel.grad_reduction import SHARDED, classify
from megagen.parallel.plan_check import plan_problems
from megagen.specs import get_spec
from megagen.specs.base import init_model
from megagen.specs.wan.spec import patchify_channels_last, shifted_schedule, unpatchify_channels_last
from tests.unit.wan_reference import diffusers_wan, megagen_from_diffusers

EXAMPLE = "examples/configs/wan_tiny.yaml"
SHAPE = (16, 3, 8, 6)  # (C, T, H, W): an odd grid of 3×4×3 patches


@pytest.fixture
def cfg():
    return load_config(EXAMPLE, [])


def _pair(cfg):
    """diffusers' tiny Wan with every weight perturbed (so no path is zero) and megagen's copy of it."""
    arch = get_spec("wan").arch(cfg)
    torch.manual_seed(0)
    reference = diffusers_wan(arch).float()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return reference, megagen_from_diffusers(reference, arch)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_forward_and_input_gradients_equal_diffusers(cfg):
    pytest.importorskip("diffusers")
    reference, model = _pair(cfg)
    spec = get_spec("wan")
    x_ref = torch.randn(2, *SHAPE, requires_grad=True)
    x_mine = x_ref.detach().clone().requires_grad_(True)
    text_ref = torch.randn(2, 7, 32, requires_grad=True)
    text_mine = text_ref.detach().clone().requires_grad_(True)
    t = torch.tensor([0.25, 0.9])  # megagen's t: 0 noise → 1 data
    theirs = reference(x_ref, (1 - t) * 1000, text_ref, return_dict=False)[0]
    batch = {"latents": x_mine, "text.umt5": text_mine}
    tokens = model(**spec.model_inputs(batch, x_mine, t, None))
    mine = -spec.from_tokens(tokens, SHAPE)  # from_tokens gives megagen's velocity; Wan predicts its negation
    assert _relative(mine, theirs) < 1e-5
    weight = torch.randn_like(theirs)
    (theirs * weight).sum().backward()
    (mine * weight).sum().backward()
    assert _relative(x_mine.grad, x_ref.grad) < 1e-5
    assert _relative(text_mine.grad, text_ref.grad) < 1e-5


def test_objective_target_is_wan_noise_minus_data():
    """megagen's path at t is Wan's at σ = 1 − t (up to σ_min), and the token target is noise − data."""
    spec = get_spec("wan")
    x0, x1 = torch.randn(2, *SHAPE), torch.randn(2, *SHAPE)
    t = torch.tensor([0.3, 0.8])
    sigma = (1 - t).view(-1, 1, 1, 1, 1)
    wan_x_t = (1 - sigma) * x1 + sigma * x0
    assert torch.allclose(interpolate(x0, x1, t), wan_x_t, atol=1e-4)
    target = spec.to_tokens(velocity_target(x0, x1, sigma_min=0.0))
    assert torch.allclose(target, patchify_channels_last(x0 - x1, (1, 2, 2)))
    assert torch.equal(spec.from_tokens(spec.to_tokens(x1), SHAPE), x1)


def test_channels_last_patch_order_round_trips():
    x = torch.randn(2, *SHAPE)
    tokens = patchify_channels_last(x, (1, 2, 2))
    assert tokens.shape == (2, 3 * 4 * 3, 64)
    assert tokens[0, 0, 1] == x[0, 1, 0, 0, 0]  # channel fastest within a patch pixel
    assert torch.equal(unpatchify_channels_last(tokens, (1, 2, 2), SHAPE), x)


def test_shifted_schedule_runs_noise_to_data():
    s = shifted_schedule(4, 5.0)
    assert s[0] == 0.0 and s[-1] == 1.0 and bool((s[1:] > s[:-1]).all())
    assert math.isclose(s[2].item(), 1 - 5 * 0.5 / (1 + 4 * 0.5), rel_tol=1e-6)


def test_text_padding_is_zeroed_and_dropped_samples_are_all_padding(cfg):
    spec = get_spec("wan")
    cfg.model.init = "live"  # every weight non-zero, so the outputs depend on the text
    model = spec.build(cfg)
    init_model(spec, model, cfg)
    x, t = torch.randn(2, *SHAPE), torch.rand(2)
    text = torch.randn(2, 6, 32)
    valid = torch.tensor([[True] * 4 + [False] * 2] * 2)
    zeroed = text.clone()
    zeroed[:, 4:] = 0
    a = model(**spec.model_inputs({"text.umt5": text, "text_valid.umt5": valid}, x, t, None))
    b = model(**spec.model_inputs({"text.umt5": zeroed}, x, t, None))
    assert torch.equal(a, b) and a.abs().max() > 0
    drop = {"umt5": torch.tensor([True, False])}
    c = model(**spec.model_inputs({"text.umt5": text}, x, t, drop))
    d = model(**spec.model_inputs({"text.umt5": torch.zeros_like(text)}, x, t, None))
    assert torch.equal(c[0], d[0])


def test_plan_is_consistent_and_sharded_norm_weights_are_sharded(cfg):
    spec = get_spec("wan")
    with torch.device("meta"):
        model = spec.build(cfg)
    plan = spec.parallel_plan(cfg)
    assert plan_problems(model, plan, tp=2) == ([], [])
    classes, problems = classify(model, plan)
    assert not problems
    assert classes["blocks.0.attn.q_norm.weight"] == SHARDED
    assert classes["blocks.1.cross_attn.k_norm.weight"] == SHARDED


@pytest.mark.parametrize("preset, low, high", [("1.3b", 1.3e9, 1.5e9), ("14b", 13.5e9, 14.5e9)])
def test_large_presets_on_meta(cfg, preset, low, high):
    cfg.model.preset = preset
    with torch.device("meta"):
        model = get_spec("wan").build(cfg)
    assert low <= sum(p.numel() for p in model.parameters()) <= high


def test_sampler_runs_a_few_steps(cfg):
    spec = get_spec("wan")
    cfg.model.init = "live"
    model = spec.build(cfg)
    init_model(spec, model, cfg)
    batch = {"latents": torch.zeros(2, *SHAPE), "text.umt5": torch.randn(2, 5, 32)}
    out = spec.sample(model, cfg, batch, steps=3, cfg_scale=3.0, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, *SHAPE) and torch.isfinite(out).all()
