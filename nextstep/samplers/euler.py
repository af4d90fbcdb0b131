"""The explicit Euler ODE solver."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nextstep.config import Config
from nextstep.registry import register_component
from nextstep.samplers.base import Sampler, VelocityFn


@dataclass
class EulerSamplerConfig(Config):
    """Euler has nothing to configure."""


@register_component("sampler", "euler")
class EulerSampler(Sampler):
    """``x <- x + (t_{k+1} - t_k) * v(x, t_k)``; first order."""

    config_class = EulerSamplerConfig
    order = 1

    def __init__(self, config: EulerSamplerConfig | None = None):
        self.config = config or EulerSamplerConfig()

    def sample(self, velocity_fn: VelocityFn, noise, time_grid, step_noise=None) -> torch.Tensor:
        x = noise
        for index in range(time_grid.shape[0] - 1):
            t = time_grid[index].expand(x.shape[0]).to(x.dtype)
            dt = (time_grid[index + 1] - time_grid[index]).to(x.dtype)
            x = x + dt * velocity_fn(x, t)
        return x
