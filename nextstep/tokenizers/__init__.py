"""Image tokenizers (images <-> continuous tokens) and text tokenizers."""

from nextstep.tokenizers.base import ImageTokenizer, TextTokenizer
from nextstep.tokenizers.byte_text import ByteTextTokenizer, ByteTextTokenizerConfig
from nextstep.tokenizers.flux_vae import FluxVAE, FluxVAEConfig
from nextstep.tokenizers.hf_text import HFTextTokenizer, HFTextTokenizerConfig
from nextstep.tokenizers.latent_normalization import (
    denormalize_latents,
    normalize_latents,
    perturb_latents,
    standardize_channels,
)
from nextstep.tokenizers.word_text import WordTextTokenizer, WordTextTokenizerConfig

__all__ = [
    "ByteTextTokenizer",
    "ByteTextTokenizerConfig",
    "FluxVAE",
    "FluxVAEConfig",
    "HFTextTokenizer",
    "HFTextTokenizerConfig",
    "ImageTokenizer",
    "TextTokenizer",
    "WordTextTokenizer",
    "WordTextTokenizerConfig",
    "denormalize_latents",
    "normalize_latents",
    "perturb_latents",
    "standardize_channels",
]
