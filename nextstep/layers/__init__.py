"""Layers shared by several components."""

from nextstep.layers.adaln import AdaLNFinalLayer, AdaLNResBlock, modulate
from nextstep.layers.rms_norm import RMSNorm
from nextstep.layers.rotary import RotaryEmbedding, apply_rotary
from nextstep.layers.timestep import TimestepEmbedder, sinusoidal_embedding
from nextstep.layers.word_vectors import WordVectorConfig, WordVectorInput

__all__ = [
    "AdaLNFinalLayer",
    "AdaLNResBlock",
    "RMSNorm",
    "RotaryEmbedding",
    "TimestepEmbedder",
    "WordVectorConfig",
    "WordVectorInput",
    "apply_rotary",
    "modulate",
    "sinusoidal_embedding",
]
