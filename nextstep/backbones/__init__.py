"""Causal transformer backbones."""

from nextstep.backbones.attention import ATTENTION_BACKENDS, attention_backend, xformers_available
from nextstep.backbones.base import AttentionBackend, Backbone, BackboneCache, KVCache, positions_from_mask
from nextstep.backbones.hf_adapter import HFBackbone, HFBackboneConfig, HFCache
from nextstep.backbones.qwen2 import Qwen2Backbone, Qwen2BackboneConfig
from nextstep.backbones.qwen2_checkpoint import load_qwen2_backbone, load_qwen2_lm_head

__all__ = [
    "ATTENTION_BACKENDS",
    "AttentionBackend",
    "Backbone",
    "BackboneCache",
    "HFBackbone",
    "HFBackboneConfig",
    "HFCache",
    "KVCache",
    "Qwen2Backbone",
    "Qwen2BackboneConfig",
    "attention_backend",
    "load_qwen2_backbone",
    "load_qwen2_lm_head",
    "positions_from_mask",
    "xformers_available",
]
