"""Samplers (ODE/SDE solvers over a velocity field), time grids, step schedules and guidance."""

from nextstep.samplers.adams_bashforth import AdamsBashforthSampler, AdamsBashforthSamplerConfig
from nextstep.samplers.base import Sampler, VelocityFn
from nextstep.samplers.coefficient_preserving import (
    CoefficientPreservingSampler,
    CoefficientPreservingSamplerConfig,
)
from nextstep.samplers.editing_guidance import ImageEditingGuidance
from nextstep.samplers.euler import EulerSampler, EulerSamplerConfig
from nextstep.samplers.euler_maruyama import EulerMaruyamaSampler, EulerMaruyamaSamplerConfig
from nextstep.samplers.flow_sde import FlowSDESampler, FlowSDESamplerConfig
from nextstep.samplers.guidance import (
    ClassifierFreeGuidance,
    Guidance,
    GuidedVelocity,
    NoGuidance,
    guidance_for_scale,
)
from nextstep.samplers.guidance_schedule import GUIDANCE_SCHEDULES, scheduled_scale
from nextstep.samplers.heun import HeunSampler, HeunSamplerConfig
from nextstep.samplers.midpoint import MidpointSampler, MidpointSamplerConfig
from nextstep.samplers.recording import RecordingSampler, TokenRecord, VelocityCall
from nextstep.samplers.step_schedule import ConstantSteps, LinearSteps, StepSchedule
from nextstep.samplers.time_grid import shift_time, time_grid, truncated_time_grid

__all__ = [
    "GUIDANCE_SCHEDULES",
    "AdamsBashforthSampler",
    "AdamsBashforthSamplerConfig",
    "ClassifierFreeGuidance",
    "CoefficientPreservingSampler",
    "CoefficientPreservingSamplerConfig",
    "ConstantSteps",
    "EulerMaruyamaSampler",
    "EulerMaruyamaSamplerConfig",
    "EulerSampler",
    "EulerSamplerConfig",
    "FlowSDESampler",
    "FlowSDESamplerConfig",
    "Guidance",
    "GuidedVelocity",
    "HeunSampler",
    "HeunSamplerConfig",
    "ImageEditingGuidance",
    "LinearSteps",
    "MidpointSampler",
    "MidpointSamplerConfig",
    "NoGuidance",
    "RecordingSampler",
    "Sampler",
    "StepSchedule",
    "TokenRecord",
    "VelocityCall",
    "VelocityFn",
    "guidance_for_scale",
    "scheduled_scale",
    "shift_time",
    "time_grid",
    "truncated_time_grid",
]
