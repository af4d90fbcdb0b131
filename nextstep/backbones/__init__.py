"""Causal transformer backbones."""

from nextstep.backbones.base import Backbone, KVCache, positions_from_mask
from nextstep.backbones.qwen2 import Qwen2Backbone, Qwen2BackboneConfig

__all__ = ["Backbone", "KVCache", "Qwen2Backbone", "Qwen2BackboneConfig", "positions_from_mask"]
