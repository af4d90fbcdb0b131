"""The Flow-GRPO SDE sampler: the later NextStep-1 release's ``sde`` mode.

Legend: N tokens, D token dim, S intervals of the grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nextstep.config import OMITTED_WHEN_DEFAULT, Config, require
from nextstep.registry import register_component
from nextstep.samplers.base import (
    Sampler,
    VelocityFn,
    check_step_noise,
    check_time_grid,
    euler_integrate,
    interval_start_times,
)

#: What `FlowSDESamplerConfig.first_step` may be.
FIRST_STEP_CHOICES = ("release", "next_time")


@dataclass
class FlowSDESamplerConfig(Config):
    """Settings of `FlowSDESampler`.

    Args:
        noise_level: a, the scale of the diffusion (0.8 in the release; 0 is Euler).
        first_step: what stands in for ``t`` in the ratio ``(1 - t) / t`` at ``t = 0``, where
            it is infinite: ``"release"`` takes ``1 - t_{S-1}`` (one minus the grid's last
            time below 1), as NextStep-1.1's ``sde`` mode does; ``"next_time"`` takes the grid's
            second time ``t_1``, as Flow-GRPO does. The two agree on an unshifted grid. On a
            grid shifted below 1 (dense near t = 1) ``1 - t_{S-1}`` is far smaller than
            ``t_1`` and the release's first step spreads the samples too wide (a Gaussian
            target's standard deviation 3.8x too large at shift 0.2 with 10 steps, against
            1.06x with ``"next_time"``): take ``"next_time"`` there.
    """

    noise_level: float = 0.8
    first_step: str = field(default="release", metadata=OMITTED_WHEN_DEFAULT)

    def validate(self) -> None:
        require(self.noise_level >= 0, "noise_level", self.noise_level, ">= 0")
        require(self.first_step in FIRST_STEP_CHOICES, "first_step", self.first_step,
                f"one of {FIRST_STEP_CHOICES}")


@register_component("sampler", "flow_sde")
class FlowSDESampler(Sampler):
    """Euler-Maruyama on ``dx = (v + g²/2 * score) dt + g dW`` with ``g = a * sqrt((1 - t) / t)``.

    One step from ``t`` to ``t'`` (``h = t' - t``, score ``(t v - x) / (1 - t)``)::

        g    = a * sqrt((1 - t) / t)          (t = 0: see ``first_step``)
        mean = x + h * (v + g² / (2 (1 - t)) * (t * v - x))
        x    = mean + g * sqrt(h) * eps

    Under ``sigma = 1 - t`` and the diffusers velocity ``u = -v`` this is the
    Flow-GRPO step ``x (1 + g² dt / (2 sigma)) + u (1 + g² (1 - sigma) / (2 sigma)) dt``
    with ``dt = sigma' - sigma``. Every step, the last one included, adds noise.
    Without ``step_noise`` (or with ``a = 0``) it is the Euler solver.
    """

    config_class = FlowSDESamplerConfig
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
        steps = time_grid.diff().to(dtype)
        x = noise
        check_step_noise(self, step_noise, noise, num_steps)
        start = time_grid[:-1].to(dtype)
        # At t = 0 the ratio (1 - t) / t is infinite; `first_step` says what stands in for t there.
        stand_in = 1 - time_grid[-2] if self.config.first_step == "release" else time_grid[1]
        safe = torch.where(start == 0, stand_in.to(dtype), start)
        variance = self.config.noise_level**2 * (1 - start) / safe  # g², (S,)
        drift_weight = (variance / (2 * (1 - start))).unbind(0)
        noise_scale = (torch.sqrt(variance) * torch.sqrt(steps)).unbind(0)
        start = start.unbind(0)
        for index, dt in enumerate(steps.unbind(0)):
            v = velocity_fn(x, times[index])
            drift = v + drift_weight[index] * (start[index] * v - x)
            x = x + dt * drift + noise_scale[index] * step_noise[index]
        return x
