"""Flow-matching objective, timestep sampling, inference schedules and samplers."""

from megagen.diffusion.flow_matching import (
    SIGMA_MIN,
    flow_matching_loss,
    flow_matching_loss_sum,
    interpolate,
    sample_timesteps,
    velocity_target,
)
from megagen.diffusion.samplers import euler_sample, linear_quadratic_schedule, linear_schedule

__all__ = [
    "SIGMA_MIN",
    "euler_sample",
    "flow_matching_loss",
    "flow_matching_loss_sum",
    "interpolate",
    "linear_quadratic_schedule",
    "linear_schedule",
    "sample_timesteps",
    "velocity_target",
]
