"""Heun's second-order ODE solver (explicit trapezoidal rule)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nextstep.config import Config
from nextstep.registry import register_component
from nextstep.samplers.base import Sampler, VelocityFn, check_time_grid


@dataclass
class HeunSamplerConfig(Config):
    """Heun has nothing to configure."""


@register_component("sampler", "heun")
class HeunSampler(Sampler):
    """Predict with Euler, correct with the average of both slopes; second order.

    ``x' = x + dt * v(x, t_k)``, then ``x <- x + dt/2 * (v(x, t_k) + v(x', t_{k+1}))``.
    The last correction evaluates the velocity at ``t_{k+1}``, so at t=1 on the
    usual grid.
    """

    config_class = HeunSamplerConfig
    order = 2
    evaluations_per_step = 2

    def evaluation_times(self, time_grid: torch.Tensor) -> torch.Tensor:
        return time_grid

    def sample(
        self,
        velocity_fn: VelocityFn,
        noise: torch.Tensor,
        time_grid: torch.Tensor,
        step_noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """noise (N, D), time_grid (S + 1,) -> samples (N, D) at ``time_grid[-1]``."""
        check_time_grid(time_grid)
        times = time_grid[:, None].expand(-1, noise.shape[0]).contiguous().unbind(0)  # (S + 1) x (N,)
        steps = time_grid.diff().to(noise.dtype)
        half_steps = (0.5 * steps).unbind(0)
        steps = steps.unbind(0)
        x = noise
        for index, (dt, half) in enumerate(zip(steps, half_steps)):
            v_start = velocity_fn(x, times[index])
            predicted = x.addcmul(v_start, dt)
            v_end = velocity_fn(predicted, times[index + 1])
            x = x.addcmul(v_start + v_end, half)
        return x
