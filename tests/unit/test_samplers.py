"""Tests for the inference schedules and the Euler sampler."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megagen.diffusion import (
    SIGMA_MIN,
    euler_sample,
    interpolate,
    linear_quadratic_schedule,
    linear_schedule,
)


def _check_schedule(s: torch.Tensor, num_steps: int) -> None:
    assert s.shape == (num_steps + 1,)
    assert s[0].item() == 0.0 and s[-1].item() == 1.0
    assert bool((s.diff() > 0).all())


def test_default_linear_quadratic_schedule():
    s = linear_quadratic_schedule()
    _check_schedule(s, 50)
    assert s[25].item() == 0.1
    torch.testing.assert_close(s.diff()[:25], torch.full((25,), 1 / 250, dtype=torch.float64))
    # First quadratic step is not smaller than the linear one; steps never shrink afterwards.
    assert s.diff()[25].item() >= 1 / 250 - 1e-15
    assert bool((s.diff().diff() >= -1e-15).all())


@settings(max_examples=40, deadline=None)
@given(data=st.data(), num_steps=st.integers(1, 80))
def test_linear_quadratic_schedule_properties(data, num_steps):
    emulated = data.draw(st.integers(num_steps, 1000), label="emulated_steps")
    hi = num_steps if emulated == num_steps else num_steps - 1
    k = data.draw(st.integers(0, hi), label="linear_steps")
    s = linear_quadratic_schedule(num_steps, k, emulated)
    _check_schedule(s, num_steps)
    torch.testing.assert_close(s[: k + 1], torch.arange(k + 1, dtype=torch.float64) / emulated)
    if k < num_steps:
        assert s.diff()[k].item() >= 1 / emulated - 1e-12


def test_emulating_same_step_count_is_linear():
    torch.testing.assert_close(linear_quadratic_schedule(10, 3, 10), linear_schedule(10))
    torch.testing.assert_close(linear_quadratic_schedule(10, 10, 10), linear_schedule(10))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_steps": 0}, "num_steps"),
        ({"num_steps": 50, "linear_steps": -1}, "linear_steps"),
        ({"num_steps": 50, "linear_steps": 51}, "linear_steps"),
        ({"num_steps": 50, "linear_steps": 50}, "linear_steps"),
        ({"num_steps": 300}, "emulated_steps"),
        ({"num_steps": 10, "emulated_steps": 5}, "emulated_steps"),
    ],
)
def test_linear_quadratic_schedule_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        linear_quadratic_schedule(**kwargs)


def test_linear_schedule():
    s = linear_schedule(8)
    _check_schedule(s, 8)
    torch.testing.assert_close(s.diff(), torch.full((8,), 1 / 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="num_steps"):
        linear_schedule(0)


SCHEDULES = [linear_schedule(7), linear_quadratic_schedule(), linear_quadratic_schedule(5, 0, 9)]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_constant_velocity_lands_on_target(schedule):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    x1 = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    out = euler_sample(lambda x, t, c: x1 - x0, x0, schedule)
    torch.testing.assert_close(out, x1, rtol=1e-12, atol=1e-12)


def test_velocity_fn_sees_schedule_times_and_cond():
    schedule = linear_quadratic_schedule(6, 2, 20)
    seen = []

    def fn(x, t, cond):
        assert t.shape == (3,) and t.dtype == torch.float32 and cond == "caption"
        seen.append(t[0].item())
        return torch.zeros_like(x)

    euler_sample(fn, torch.randn(3, 2), schedule, cond="caption")
    torch.testing.assert_close(
        torch.tensor(seen, dtype=torch.float64), schedule[:-1].to(torch.float32).double()
    )


def test_oracle_velocity_recovers_data():
    """The optimal velocity at x_t given known data x1 keeps Euler exactly on the straight path."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 8, generator=g, dtype=torch.float64)
    x1 = torch.randn(4, 8, generator=g, dtype=torch.float64)
    c = 1 - SIGMA_MIN
    visited = []

    def oracle(x, t, cond):
        visited.append((x, t))
        tb = t[:, None]
        return (x1 - c * x) / (1 - c * tb)

    out = euler_sample(oracle, x0, linear_quadratic_schedule())
    torch.testing.assert_close(out, interpolate(x0, x1, torch.ones(4)), rtol=1e-9, atol=1e-9)
    for x, t in visited:  # every intermediate state lies on the interpolation path
        torch.testing.assert_close(x, interpolate(x0, x1, t), rtol=1e-9, atol=1e-9)


def test_cfg_scale_one_is_conditional_only():
    calls = []

    def fn(x, t, cond):
        calls.append(cond)
        return torch.full_like(x, float(cond))

    out = euler_sample(fn, torch.zeros(2, 3), linear_schedule(4), cond=2.0, uncond=-5.0, cfg_scale=1.0)
    assert calls == [2.0] * 4
    torch.testing.assert_close(out, torch.full((2, 3), 2.0))


@pytest.mark.parametrize("scale", [0.0, 3.0, 7.5])
def test_cfg_combination(scale):
    a_c, a_u = 0.3, -0.7

    def fn(x, t, cond):
        return cond * x + 1.0

    x = torch.randn(2, 5, dtype=torch.float64)
    out = euler_sample(fn, x, linear_schedule(1), cond=a_c, uncond=a_u, cfg_scale=scale)
    v_c, v_u = a_c * x + 1.0, a_u * x + 1.0
    torch.testing.assert_close(out, x + v_u + scale * (v_c - v_u))


def test_cfg_requires_uncond_and_schedule_is_validated():
    def zero(x, t, c):
        return torch.zeros_like(x)

    with pytest.raises(ValueError, match="uncond"):
        euler_sample(zero, torch.zeros(1, 2), linear_schedule(2), cond=1, cfg_scale=2.0)
    with pytest.raises(ValueError, match="schedule"):
        euler_sample(zero, torch.zeros(1, 2), torch.zeros(1))


def test_sampler_runs_without_grad():
    w = torch.ones(1, requires_grad=True)
    out = euler_sample(lambda x, t, c: w * x, torch.ones(2, 2), linear_schedule(3))
    assert not out.requires_grad
