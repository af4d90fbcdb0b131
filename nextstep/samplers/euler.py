"""The explicit Euler ODE solver."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nextstep.config import Config
from nextstep.registry import register_component
from nextstep.samplers.base import Sampler, VelocityFn, check_time_grid, euler_integrate


@dataclass
class EulerSamplerConfig(Config):
    """Euler has nothing to configure."""


@register_component("sampler", "euler")
class EulerSampler(Sampler):
    """``x <- x + (t_{k+1} - t_k) * v(x, t_k)``; first order, one evaluation per step.

    This is the later NextStep-1 release's ``ode`` mode.
    """

    config_class = EulerSamplerConfig
    order = 1
    evaluations_per_step = 1

    def evaluation_times(self, time_grid: torch.Tensor) -> torch.Tensor:
        return time_grid[:-1]

    def sample(
        self,
        velocity_fn: VelocityFn,
        noise: torch.Tensor,
        time_grid: torch.Tensor,
        step_noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """noise (N, D), time_grid (S + 1,) -> samples (N, D) at ``time_grid[-1]``."""
        check_time_grid(time_grid)
        return euler_integrate(velocity_fn, noise, time_grid)
