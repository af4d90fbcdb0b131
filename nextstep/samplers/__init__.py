"""Samplers (ODE/SDE solvers over a velocity field), time grids and guidance."""

from nextstep.samplers.base import Sampler, VelocityFn
from nextstep.samplers.euler import EulerSampler, EulerSamplerConfig
from nextstep.samplers.guidance import (
    ClassifierFreeGuidance,
    Guidance,
    GuidedVelocity,
    NoGuidance,
    guidance_for_scale,
)
from nextstep.samplers.heun import HeunSampler, HeunSamplerConfig
from nextstep.samplers.time_grid import shift_time, time_grid

__all__ = [
    "ClassifierFreeGuidance",
    "EulerSampler",
    "EulerSamplerConfig",
    "Guidance",
    "GuidedVelocity",
    "HeunSampler",
    "HeunSamplerConfig",
    "NoGuidance",
    "Sampler",
    "VelocityFn",
    "guidance_for_scale",
    "shift_time",
    "time_grid",
]
