"""Euler-Maruyama on the flow's SDE: the first NextStep-1 release's sampler.

Legend: N tokens, D token dim, S intervals of the grid.
"""

from __future__ import annotations

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
from nextstep.samplers.time_grid import truncated_time_grid


@dataclass
class EulerMaruyamaSamplerConfig(Config):
    """Settings of `EulerMaruyamaSampler`.

    Args:
        last_step_size: L, size of the final deterministic Euler step (0.04 in the
            release). 0 makes every interval of the plain shifted grid an SDE step.
        to_one: end the final step at t=1. The release (``False``) ends at
            ``shift(1 - L) + L``, short of 1 whenever the shift is not 1.
    """

    last_step_size: float = 0.04
    to_one: bool = False

    def validate(self) -> None:
        require(0.0 <= self.last_step_size < 1.0, "last_step_size", self.last_step_size, "in [0, 1)")


@register_component("sampler", "euler_maruyama")
class EulerMaruyamaSampler(Sampler):
    """The release's SDE sampler, step for step.

    On the grid of `nextstep.samplers.time_grid.truncated_time_grid` every
    interval but the last is an Euler-Maruyama step of
    ``dx = (v + (1 - t) * score) dt + sqrt(2 (1 - t)) dW`` with the score of the
    linear path ``score = (t * v - x) / (1 - t)``::

        mean = x + (v + (1 - t) * score) * dt
        x    = mean + sqrt(2 * (1 - t)) * (eps * sqrt(dt))

    and the last interval is one deterministic Euler step ``x + v(x, t) * dt``
    (of size ``last_step_size`` unless ``to_one``). With ``last_step_size = 0``
    every interval is an SDE step.

    Without ``step_noise`` the sampler runs its zero-noise limit (the SDE's
    probability-flow ODE ``dx = v dt``), which is the Euler solver on the same grid.
    """

    config_class = EulerMaruyamaSamplerConfig
    order = 1
    evaluations_per_step = 1
    stochastic = True

    def make_time_grid(self, num_steps, shift=1.0, *, device=None, dtype=torch.float32) -> torch.Tensor:
        """The release grid (see `nextstep.samplers.time_grid.truncated_time_grid`), (S + 1,)."""
        return truncated_time_grid(num_steps, shift, self.config.last_step_size,
                                   to_one=self.config.to_one, device=device, dtype=dtype)

    def evaluation_times(self, time_grid: torch.Tensor) -> torch.Tensor:
        return time_grid[:-1]

    def sample(
        self,
        velocity_fn: VelocityFn,
        noise: torch.Tensor,
        time_grid: torch.Tensor,
        step_noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """noise (N, D), time_grid (S + 1,), step_noise (S, N, D) -> samples (N, D).

        ``step_noise`` holds S slices, as every stochastic sampler takes; only the first
        ``S - 1`` are used when ``last_step_size > 0`` (the last step is deterministic).
        """
        check_time_grid(time_grid)
        num_steps = time_grid.shape[0] - 1
        if step_noise is None:
            return euler_integrate(velocity_fn, noise, time_grid)
        times = interval_start_times(time_grid, noise.shape[0])  # S x (N,)
        dtype = noise.dtype
        steps = time_grid.diff().to(dtype)
        x = noise
        check_step_noise(self, step_noise, noise, num_steps)
        sde_steps = num_steps - 1 if self.config.last_step_size > 0 else num_steps
        one_minus_t = (1 - time_grid[:-1]).to(dtype)
        diffusion = torch.sqrt(2 * one_minus_t).unbind(0)
        root_steps = torch.sqrt(steps).unbind(0)
        t_scalar = time_grid[:-1].to(dtype).unbind(0)
        one_minus_t = one_minus_t.unbind(0)
        steps = steps.unbind(0)
        for index in range(sde_steps):
            t = t_scalar[index]
            v = velocity_fn(x, times[index])
            score = (t * v - x) / one_minus_t[index]
            mean = x + (v + one_minus_t[index] * score) * steps[index]
            x = mean + diffusion[index] * (step_noise[index] * root_steps[index])
        for index in range(sde_steps, num_steps):
            x = x + velocity_fn(x, times[index]) * steps[index]
        return x
