"""Heun's second-order ODE solver (explicit trapezoidal rule)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nextstep.config import Config
from nextstep.registry import register_component
from nextstep.samplers.base import Sampler, VelocityFn


@dataclass
class HeunSamplerConfig(Config):
    """Heun has nothing to configure."""


@register_component("sampler", "heun")
class HeunSampler(Sampler):
    """Predict with Euler, correct with the average of both slopes; second order."""

    config_class = HeunSamplerConfig
    order = 2
    evaluations_per_step = 2

    def __init__(self, config: HeunSamplerConfig | None = None):
        self.config = config or HeunSamplerConfig()

    def sample(self, velocity_fn: VelocityFn, noise, time_grid, step_noise=None) -> torch.Tensor:
        x = noise
        for index in range(time_grid.shape[0] - 1):
            t0 = time_grid[index].expand(x.shape[0]).to(x.dtype)
            t1 = time_grid[index + 1].expand(x.shape[0]).to(x.dtype)
            dt = (time_grid[index + 1] - time_grid[index]).to(x.dtype)
            v0 = velocity_fn(x, t0)
            predicted = x + dt * v0
            v1 = velocity_fn(predicted, t1)
            x = x + dt * 0.5 * (v0 + v1)
        return x
