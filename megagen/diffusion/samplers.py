"""Inference-time t-schedules and the Euler ODE sampler for flow-matching models.

Schedules run from t = 0 (noise) to t = 1 (data), matching :mod:`megagen.diffusion.flow_matching`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

VelocityFn = Callable[[Tensor, Tensor, Any], Tensor]


def linear_schedule(num_steps: int) -> Tensor:
    """``num_steps + 1`` uniformly spaced points from 0 to 1 (float64)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64)


def linear_quadratic_schedule(
    num_steps: int = 50, linear_steps: int | None = None, emulated_steps: int = 250
) -> Tensor:
    """Movie Gen's linear-quadratic schedule: ``num_steps + 1`` float64 points from 0 to exactly 1.

    Most of the sample's structure forms near the noise end, so the first ``k = linear_steps`` steps
    (default ``num_steps // 2``) copy the fine steps of an ``N = emulated_steps``-step linear schedule,
    ``t_i = i / N`` for ``i <= k``; the remaining ``m = num_steps - k`` steps cover ``[k/N, 1]``
    quadratically:

        t_{k+j} = k/N + j/N + b * j * (j - 1),   b = (1 - k/N - m/N) / (m * (m - 1))   (b = 0 if m <= 1)

    Increments are ``1/N + 2*b*j``: the first quadratic step equals the linear step (no kink downwards),
    and later steps grow linearly. ``N >= num_steps`` ensures ``b >= 0``, hence a strictly increasing
    schedule; ``N == num_steps`` reduces to :func:`linear_schedule`.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if emulated_steps < num_steps:
        raise ValueError(
            f"emulated_steps must be >= num_steps ({num_steps}) since it emulates a finer schedule, "
            f"got {emulated_steps}"
        )
    k = num_steps // 2 if linear_steps is None else linear_steps
    if not 0 <= k <= num_steps:
        raise ValueError(f"linear_steps must be in [0, num_steps={num_steps}], got {k}")
    if k == num_steps and k != emulated_steps:
        raise ValueError(
            f"linear_steps == num_steps ({k}) only reaches t=1 if emulated_steps == num_steps, "
            f"got emulated_steps={emulated_steps}"
        )
    n_emu = float(emulated_steps)
    m = num_steps - k
    t_k = k / n_emu
    b = (1.0 - t_k - m / n_emu) / (m * (m - 1)) if m > 1 else 0.0
    linear = torch.arange(k + 1, dtype=torch.float64) / n_emu
    j = torch.arange(1, m + 1, dtype=torch.float64)
    quadratic = t_k + j / n_emu + b * j * (j - 1)
    schedule = torch.cat([linear, quadratic])
    schedule[-1] = 1.0  # exact endpoint despite rounding
    return schedule


@torch.no_grad()
def euler_sample(
    velocity_fn: VelocityFn,
    noise: Tensor,
    schedule: Tensor,
    cond: Any = None,
    uncond: Any = None,
    cfg_scale: float = 1.0,
) -> Tensor:
    """Integrate ``dx/dt = v(x, t)`` from ``schedule[0]`` to ``schedule[-1]`` with explicit Euler steps.

    ``velocity_fn(x, t, cond)`` gets ``t`` of shape ``(B,)`` (float32, or float64 for float64 ``noise``);
    ``cond``/``uncond`` are passed through untouched. With ``cfg_scale != 1`` classifier-free guidance
    evaluates both and uses ``v_uncond + cfg_scale * (v_cond - v_uncond)``; ``uncond`` is then required.
    """
    if schedule.ndim != 1 or schedule.numel() < 2:
        raise ValueError(f"schedule must be 1-D with >= 2 points, got shape {tuple(schedule.shape)}")
    guided = cfg_scale != 1.0
    if guided and uncond is None:
        raise ValueError(f"uncond is required when cfg_scale != 1 (got cfg_scale={cfg_scale})")
    t_dtype = torch.promote_types(noise.dtype, torch.float32)
    ts = schedule.to(torch.float64).tolist()
    x = noise
    for t_cur, t_next in itertools.pairwise(ts):
        t_batch = torch.full((x.shape[0],), t_cur, dtype=t_dtype, device=x.device)
        v = velocity_fn(x, t_batch, cond)
        if guided:
            v_uncond = velocity_fn(x, t_batch, uncond)
            v = v_uncond + cfg_scale * (v - v_uncond)
        x = x + (t_next - t_cur) * v.to(x.dtype)
    return x
