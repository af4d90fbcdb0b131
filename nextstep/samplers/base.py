"""The sampler interface: integrate a velocity field from noise (t=0) to data (t=1).

Legend: N tokens sampled together, D token dim, S steps.

A sampler is stateless: everything it needs comes in as arguments, so one
instance serves any batch, any step count and any guidance.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

import torch


class VelocityFn(Protocol):
    """``(x_t (N, D), t (N,)) -> velocity (N, D)``, guidance already applied."""

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...


class Sampler(ABC):
    """Integrates ``dx/dt = v(x, t)`` over a time grid.

    Attributes:
        order: the solver's order of convergence on smooth ODEs (1 for Euler).
        evaluations_per_step: velocity calls per interval of the grid.
        stochastic: whether `sample` consumes ``step_noise``; generation then
            draws (S, N, D) standard normal noise per token from each image's generator.
    """

    order: int = 1
    evaluations_per_step: int = 1
    stochastic: bool = False

    @abstractmethod
    def sample(
        self,
        velocity_fn: VelocityFn,
        noise: torch.Tensor,
        time_grid: torch.Tensor,
        step_noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Integrate from ``noise`` at ``time_grid[0]`` to ``time_grid[-1]``.

        Args:
            velocity_fn: the (guided) velocity field.
            noise: (N, D) starting points x0.
            time_grid: (S + 1,) increasing times, usually from 0 to 1.
            step_noise: (S, N, D) standard normal noise for stochastic samplers,
                drawn by the caller so that results depend only on its generators.

        Returns:
            (N, D) samples at the last time.
        """
