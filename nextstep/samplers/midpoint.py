"""The explicit midpoint ODE solver."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nextstep.config import Config
from nextstep.registry import register_component
from nextstep.samplers.base import Sampler, VelocityFn, check_time_grid


@dataclass
class MidpointSamplerConfig(Config):
    """The midpoint method has nothing to configure."""


def midpoint_times(time_grid: torch.Tensor) -> torch.Tensor:
    """(S + 1,) grid -> (S,) centres ``t_k + (t_{k+1} - t_k) / 2`` of its intervals."""
    return time_grid[:-1] + 0.5 * time_grid.diff()


@register_component("sampler", "midpoint")
class MidpointSampler(Sampler):
    """``x <- x + dt * v(x + dt/2 * v(x, t_k), t_k + dt/2)``; second order, two evaluations per step.

    Unlike Heun it never evaluates the velocity at the end of the grid (t=1).
    """

    config_class = MidpointSamplerConfig
    order = 2
    evaluations_per_step = 2

    def evaluation_times(self, time_grid: torch.Tensor) -> torch.Tensor:
        return torch.stack([time_grid[:-1], midpoint_times(time_grid)], dim=1).flatten()

    def sample(
        self,
        velocity_fn: VelocityFn,
        noise: torch.Tensor,
        time_grid: torch.Tensor,
        step_noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """noise (N, D), time_grid (S + 1,) -> samples (N, D) at ``time_grid[-1]``."""
        check_time_grid(time_grid)
        rows = noise.shape[0]
        starts = time_grid[:-1, None].expand(-1, rows).contiguous().unbind(0)  # S x (N,)
        centres = midpoint_times(time_grid)[:, None].expand(-1, rows).contiguous().unbind(0)
        steps = time_grid.diff().to(noise.dtype)
        half_steps = (0.5 * steps).unbind(0)
        x = noise
        for t, centre, dt, half in zip(starts, centres, steps.unbind(0), half_steps):
            x_mid = x.addcmul(velocity_fn(x, t), half)
            x = x.addcmul(velocity_fn(x_mid, centre), dt)
        return x
