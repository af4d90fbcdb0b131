"""nextstep: NextStep-1 autoregressive text-to-image generation with continuous tokens.

Components plug into four small interfaces: `ImageTokenizer`,
`Backbone`, `ImageHead` and `Sampler`.
"""

from nextstep.backbones import Backbone, HFBackbone, HFBackboneConfig, KVCache, Qwen2Backbone, Qwen2BackboneConfig
from nextstep.builders import build_component, build_model, load_model
from nextstep.config import ComponentSpec, Config
from nextstep.generation import generate, generate_tokens
from nextstep.heads import FlowMatchingHead, FlowMatchingHeadConfig, ImageHead, LMHead
from nextstep.model import LossOutput, NextStep
from nextstep.model_config import ModelConfig
from nextstep.registry import (
    component_class,
    component_names,
    model_names,
    model_preset,
    register_component,
    register_model,
)
from nextstep.samplers import (
    ClassifierFreeGuidance,
    EulerMaruyamaSampler,
    EulerSampler,
    HeunSampler,
    ImageEditingGuidance,
    MidpointSampler,
    Sampler,
    guidance_for_scale,
    time_grid,
)
from nextstep.sequence import SequenceBatch, SequenceBuilder
from nextstep.tokenizers import (
    ByteTextTokenizer,
    FluxVAE,
    FluxVAEConfig,
    HFTextTokenizer,
    ImageTokenizer,
    TextTokenizer,
)

__version__ = "0.1.0"

__all__ = [
    "Backbone",
    "ByteTextTokenizer",
    "ClassifierFreeGuidance",
    "ComponentSpec",
    "Config",
    "EulerMaruyamaSampler",
    "EulerSampler",
    "FlowMatchingHead",
    "FlowMatchingHeadConfig",
    "FluxVAE",
    "FluxVAEConfig",
    "HFBackbone",
    "HFBackboneConfig",
    "HFTextTokenizer",
    "HeunSampler",
    "ImageEditingGuidance",
    "ImageHead",
    "ImageTokenizer",
    "KVCache",
    "LMHead",
    "LossOutput",
    "MidpointSampler",
    "ModelConfig",
    "NextStep",
    "Qwen2Backbone",
    "Qwen2BackboneConfig",
    "Sampler",
    "SequenceBatch",
    "SequenceBuilder",
    "TextTokenizer",
    "build_component",
    "build_model",
    "component_class",
    "component_names",
    "generate",
    "generate_tokens",
    "guidance_for_scale",
    "load_model",
    "model_names",
    "model_preset",
    "register_component",
    "register_model",
    "time_grid",
]
