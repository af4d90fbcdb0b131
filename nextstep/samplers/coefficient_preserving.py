"""Coefficient-preserving sampling (CPS): the later NextStep-1 release's ``cps`` mode.

Legend: N tokens, D token dim, S intervals of the grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nextstep.config import Config, require
from nextstep.registry import register_component
from nextstep.samplers.base import (
    Sampler,
    VelocityFn,
    check_step_noise,
    check_time_grid,
    euler_integrate,
    interval_start_times,
)


@dataclass
class CoefficientPreservingSamplerConfig(Config):
    """Settings of `CoefficientPreservingSampler`.

    Args:
        noise_level: a in [0, 1]; the fresh noise of a step is ``sin(a * pi / 2)``
            of the noise coefficient left at its end (0 is Euler, 1 replaces all of it).
    """

    noise_level: float = 0.8

    def validate(self) -> None:
        require(0 <= self.noise_level <= 1, "noise_level", self.noise_level, "in [0, 1]")


@register_component("sampler", "cps")
class CoefficientPreservingSampler(Sampler):
    """Stochastic steps that keep ``x_t = t * data + (1 - t) * noise`` exactly in shape.

    From ``t`` to ``t'`` with ``sigma' = 1 - t'``::

        data  = x + (1 - t) * v          predicted x1
        noise = x - t * v                predicted x0
        s     = sigma' * sin(a * pi / 2)
        x     = t' * data + sqrt(sigma'^2 - s^2) * noise + s * eps

    The data and total noise coefficients stay ``t'`` and ``sigma'``, so the
    step lands on the path; the last step (``t' = 1``) returns the predicted
    data. Without ``step_noise`` (or with ``a = 0``) it equals the Euler solver.

    The fresh noise is a fixed fraction of each step's noise level, so it does
    not shrink with the step size: with many steps the samples keep the right
    mean but come out under-dispersed (for Gaussian data of standard deviation
    0.5, about 0.4 at 100 steps and ``a = 0.8``). It is an exploration sampler
    (it was introduced for reinforcement learning), not a more accurate one.
    """

    config_class = CoefficientPreservingSamplerConfig
    order = 1
    evaluations_per_step = 1
    stochastic = True

    def evaluation_times(self, time_grid: torch.Tensor) -> torch.Tensor:
        return time_grid[:-1]

    def sample(
        self,
        velocity_fn: VelocityFn,
        noise: torch.Tensor,
        time_grid: torch.Tensor,
        step_noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """noise (N, D), time_grid (S + 1,), step_noise (S, N, D) -> samples (N, D)."""
        check_time_grid(time_grid)
        num_steps = time_grid.shape[0] - 1
        if step_noise is None or self.config.noise_level == 0:
            return euler_integrate(velocity_fn, noise, time_grid)
        times = interval_start_times(time_grid, noise.shape[0])  # S x (N,)
        dtype = noise.dtype
        x = noise
        check_step_noise(self, step_noise, noise, num_steps)
        start = time_grid[:-1].to(dtype)
        end = time_grid[1:].to(dtype)
        fresh = (1 - end) * math.sin(self.config.noise_level * math.pi / 2)
        kept = torch.sqrt(((1 - end) ** 2 - fresh**2).clamp_min(0))
        coefficients = zip((1 - start).unbind(0), start.unbind(0), end.unbind(0), kept.unbind(0),
                           fresh.unbind(0))
        for index, (sigma, t, t_next, keep, new) in enumerate(coefficients):
            v = velocity_fn(x, times[index])
            data = x + sigma * v
            predicted_noise = x - t * v
            x = t_next * data + keep * predicted_noise + new * step_noise[index]
        return x
