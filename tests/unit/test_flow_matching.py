"""Tests for the flow-matching path, target, timestep sampler and loss."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megagen.diffusion import (
    SIGMA_MIN,
    flow_matching_loss,
    flow_matching_loss_sum,
    interpolate,
    sample_timesteps,
    velocity_target,
)


def _pair(shape=(3, 4, 5), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype), torch.randn(shape, generator=g, dtype=dtype)


def test_interpolate_endpoints():
    x0, x1 = _pair()
    b = x0.shape[0]
    torch.testing.assert_close(interpolate(x0, x1, torch.zeros(b)), x0, rtol=0, atol=0)
    # At t=1 only sigma_min * x0 of noise remains.
    torch.testing.assert_close(interpolate(x0, x1, torch.ones(b)), x1 + SIGMA_MIN * x0)
    torch.testing.assert_close(interpolate(x0, x1, torch.ones(b), sigma_min=0.0), x1, rtol=0, atol=0)


def test_interpolate_per_sample_t_and_dtype():
    x0, x1 = _pair(dtype=torch.float32)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    xt = interpolate(x0, x1, t, sigma_min=0.0)
    assert xt.dtype == torch.float32
    torch.testing.assert_close(xt[1], 0.5 * (x0[1] + x1[1]))
    with pytest.raises(ValueError, match="t must have shape"):
        interpolate(x0, x1, torch.zeros(2))


@pytest.mark.parametrize("sigma_min", [SIGMA_MIN, 0.0, 0.1])
def test_velocity_target_is_time_derivative(sigma_min):
    x0, x1 = _pair()
    h = 1e-4
    for t0 in (0.1, 0.5, 0.9):
        lo = interpolate(x0, x1, torch.full((3,), t0 - h, dtype=torch.float64), sigma_min)
        hi = interpolate(x0, x1, torch.full((3,), t0 + h, dtype=torch.float64), sigma_min)
        fd = (hi - lo) / (2 * h)
        torch.testing.assert_close(fd, velocity_target(x0, x1, sigma_min), rtol=1e-8, atol=1e-8)


@settings(max_examples=20, deadline=None)
@given(t=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_path_moves_along_target(t, seed):
    """x_t = x0 + t * v for every t: the path is a straight line with velocity v."""
    x0, x1 = _pair(seed=seed)
    xt = interpolate(x0, x1, torch.full((3,), t, dtype=torch.float64))
    torch.testing.assert_close(xt, x0 + t * velocity_target(x0, x1))


def test_sample_timesteps_distribution_and_reproducibility():
    t = sample_timesteps(20000, generator=torch.Generator().manual_seed(0))
    assert t.shape == (20000,) and t.dtype == torch.float32
    assert bool(((t > 0) & (t < 1)).all())
    assert abs(t.median().item() - 0.5) < 0.02
    again = sample_timesteps(20000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(t, again, rtol=0, atol=0)
    other = sample_timesteps(20000, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(t, other)


def test_sample_timesteps_mean_shifts_median():
    t = sample_timesteps(20000, generator=torch.Generator().manual_seed(0), mean=1.0, std=0.5)
    assert abs(t.median().item() - 1 / (1 + math.exp(-1.0))) < 0.02


def test_sample_timesteps_device_moves_after_cpu_draw():
    t = sample_timesteps(4, generator=torch.Generator().manual_seed(3), device="meta")
    assert t.device.type == "meta" and t.shape == (4,)


def test_loss_zero_when_pred_equals_target():
    pred, _ = _pair(dtype=torch.float32)
    loss_sum, count = flow_matching_loss_sum(pred, pred.clone())
    assert loss_sum.item() == 0.0 and count.item() == 12.0
    assert flow_matching_loss(pred, pred.clone()).item() == 0.0


def test_loss_value_is_mean_over_channels_summed_over_tokens():
    pred, target = _pair()
    loss_sum, count = flow_matching_loss_sum(pred, target)
    torch.testing.assert_close(loss_sum, ((pred - target) ** 2).mean(-1).sum())
    torch.testing.assert_close(flow_matching_loss(pred, target), ((pred - target) ** 2).mean())
    assert count.dtype == torch.float64 and count.item() == 12.0


def test_masked_tokens_ignored_even_if_nan_or_inf():
    pred, target = _pair(dtype=torch.float32)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[0, 1] = mask[2, 3] = mask[1, 0] = False
    ref_sum, _ = flow_matching_loss_sum(pred, target, mask)
    bad = pred.clone()
    bad[0, 1] = float("nan")
    bad[2, 3] = float("inf")
    bad[1, 0] = -float("inf")
    bad.requires_grad_(True)
    loss_sum, count = flow_matching_loss_sum(bad, target, mask)
    assert count.item() == 9.0
    torch.testing.assert_close(loss_sum, ref_sum, rtol=0, atol=0)
    loss_sum.backward()
    assert torch.isfinite(bad.grad).all()
    assert (bad.grad[~mask] == 0).all()
    valid = mask.unsqueeze(-1).expand_as(pred)
    expected = ((pred - target)[valid] ** 2).sum() / pred.shape[-1] / 9
    torch.testing.assert_close(flow_matching_loss(bad.detach(), target, mask), expected)


def test_all_masked_gives_zero_not_nan():
    pred, target = _pair(dtype=torch.float32)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    loss_sum, count = flow_matching_loss_sum(pred, target, mask)
    assert loss_sum.item() == 0.0 and count.item() == 0.0
    assert flow_matching_loss(pred, target, mask).item() == 0.0


def test_loss_accumulates_low_precision_in_fp32():
    pred, target = _pair(dtype=torch.bfloat16)
    loss_sum, count = flow_matching_loss_sum(pred, target)
    assert loss_sum.dtype == torch.float32 and count.dtype == torch.float32


def test_loss_rejects_bad_shapes():
    pred, target = _pair()
    with pytest.raises(ValueError, match="pred and target"):
        flow_matching_loss_sum(pred, target[:, :2])
    with pytest.raises(ValueError, match="token_mask"):
        flow_matching_loss_sum(pred, target, torch.ones(3, 4))
