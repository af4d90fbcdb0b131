"""Layers shared by several components."""

from nextstep.layers.adaln import AdaLNFinalLayer, AdaLNResBlock, modulate
from nextstep.layers.rms_norm import RMSNorm
from nextstep.layers.rotary import RotaryEmbedding, apply_rotary
from nextstep.layers.timestep import TimestepEmbedder, sinusoidal_embedding

__all__ = [
    "AdaLNFinalLayer",
    "AdaLNResBlock",
    "RMSNorm",
    "RotaryEmbedding",
    "TimestepEmbedder",
    "apply_rotary",
    "modulate",
    "sinusoidal_embedding",
]
