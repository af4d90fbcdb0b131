"""The two-step Adams-Bashforth ODE solver: second order at one velocity evaluation per step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nextstep.config import Config
from nextstep.registry import register_component
from nextstep.samplers.base import Sampler, VelocityFn, check_time_grid, interval_start_times


@dataclass
class AdamsBashforthSamplerConfig(Config):
    """Adams-Bashforth has nothing to configure."""


def adams_bashforth_coefficients(time_grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights of the current and the previous velocity in each step, in float64.

    On a grid with steps ``h_k = t_{k+1} - t_k`` and ``r = h_k / h_{k-1}``, step ``k`` is
    ``x <- x + b_k * v_k + c_k * v_{k-1}`` with ``b_k = h_k (1 + r / 2)`` and
    ``c_k = -h_k r / 2``: the integral over the step of the line through the last two
    velocities. The first step (and one after an empty step) has no usable previous velocity
    and is an Euler step: ``b = h``, ``c = 0``.

    Args:
        time_grid: (S + 1,) increasing times.

    Returns:
        ``b`` and ``c``, each (S,) float64 on the grid's device.
    """
    steps = time_grid.detach().double().diff()
    previous = torch.cat([steps.new_zeros(1), steps[:-1]])
    ratio = torch.where(previous > 0, steps / torch.where(previous > 0, previous, 1.0), 0.0)
    return steps * (1 + 0.5 * ratio), -0.5 * steps * ratio


@register_component("sampler", "adams_bashforth")
class AdamsBashforthSampler(Sampler):
    """Two-step Adams-Bashforth: ``x <- x + h_k ((1 + r/2) v(x_k, t_k) - (r/2) v(x_{k-1}, t_{k-1}))``
    with ``r = h_k / h_{k-1}``; second order, one evaluation per step.

    It reuses the velocity of the previous step instead of evaluating a second
    point, so it costs what Euler costs on the same grid; the first step is an
    Euler step. Like Euler it never evaluates the velocity at the end of the grid.
    See `adams_bashforth_coefficients`.
    """

    config_class = AdamsBashforthSamplerConfig
    order = 2
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
        current, previous = adams_bashforth_coefficients(time_grid)
        current, previous = current.to(noise.dtype).unbind(0), previous.to(noise.dtype).unbind(0)
        x, last = noise, None
        for t, b, c in zip(interval_start_times(time_grid, noise.shape[0]), current, previous):
            velocity = velocity_fn(x, t)
            x = x.addcmul(velocity, b)
            if last is not None:
                x = x.addcmul(last, c)
            last = velocity
        return x
