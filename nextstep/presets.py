"""Model presets: functions that only set numbers and return a `ModelConfig`."""

from __future__ import annotations

from nextstep.backbones.qwen2 import Qwen2BackboneConfig
from nextstep.config import ComponentSpec
from nextstep.heads.flow_matching import FlowMatchingHeadConfig
from nextstep.model_config import ModelConfig
from nextstep.registry import register_model
from nextstep.samplers.euler import EulerSamplerConfig
from nextstep.tokenizers.byte_text import ByteTextTokenizer, ByteTextTokenizerConfig
from nextstep.tokenizers.flux_vae import FluxVAEConfig
from nextstep.tokenizers.hf_text import HFTextTokenizerConfig

#: Flow-head sizes (depth, width) of the paper's small / base / large heads.
HEAD_SIZES = {"tiny": (2, 64), "small": (6, 1024), "base": (12, 1536), "large": (24, 2048)}


def flux_vae_config(size: str = "flux") -> FluxVAEConfig:
    """``flux``: the FLUX.1 shape (ch 128, 2 blocks); ``tiny``: ch 32, 1 block, 8 groups."""
    if size == "flux":
        return FluxVAEConfig()
    if size == "tiny":
        return FluxVAEConfig(ch=32, ch_mult=(1, 2, 4, 4), num_res_blocks=1, norm_groups=8)
    raise ValueError(f"unknown VAE size {size!r}; known: ['flux', 'tiny']")


def flow_head_config(size: str, condition_dim: int, token_dim: int = 64) -> FlowMatchingHeadConfig:
    """A flow-head config of one of `HEAD_SIZES`."""
    if size not in HEAD_SIZES:
        raise ValueError(f"unknown head size {size!r}; known: {sorted(HEAD_SIZES)}")
    depth, width = HEAD_SIZES[size]
    return FlowMatchingHeadConfig(token_dim=token_dim, condition_dim=condition_dim, width=width, depth=depth)


def compose(vae, text, text_type, backbone, head, **model_fields) -> ModelConfig:
    return ModelConfig(
        image_tokenizer=ComponentSpec("image_tokenizer", "flux_vae", vae),
        text_tokenizer=ComponentSpec("text_tokenizer", text_type, text),
        backbone=ComponentSpec("backbone", "qwen2", backbone),
        image_head=ComponentSpec("image_head", "flow_matching", head),
        sampler=ComponentSpec("sampler", "euler", EulerSamplerConfig()),
        **model_fields,
    )


@register_model("tiny")
def tiny() -> ModelConfig:
    """A CPU-sized model: tiny VAE, 2-layer 64-wide backbone, 2 x 64 head, byte tokenizer."""
    vocab = ByteTextTokenizer().vocab_size
    backbone = Qwen2BackboneConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=2, rope_theta=10000.0, rms_norm_eps=1e-6,
    )
    return compose(flux_vae_config("tiny"), ByteTextTokenizerConfig(), "byte", backbone,
                   flow_head_config("tiny", backbone.hidden_size))


@register_model("compact")
def compact(hidden_size: int = 256, num_layers: int = 4, num_heads: int = 8, num_kv_heads: int = 4,
            head_width: int = 256, head_depth: int = 3) -> ModelConfig:
    """A laptop-sized model, the shape of the shipped ``emoji-shapes-64``: a few-million-parameter
    backbone with a 3x intermediate MLP, a 3 x 256 head, byte tokenizer, tiny VAE.

    Args:
        hidden_size: backbone width.
        num_layers: backbone depth.
        num_heads: attention heads.
        num_kv_heads: key/value heads (dividing ``num_heads``).
        head_width: flow-head width.
        head_depth: flow-head residual blocks.
    """
    vocab = ByteTextTokenizer().vocab_size
    backbone = Qwen2BackboneConfig(
        vocab_size=vocab, hidden_size=hidden_size, intermediate_size=3 * hidden_size, num_layers=num_layers,
        num_heads=num_heads, num_kv_heads=num_kv_heads, rope_theta=10000.0, rms_norm_eps=1e-6,
    )
    head = FlowMatchingHeadConfig(token_dim=64, condition_dim=hidden_size, width=head_width, depth=head_depth)
    return compose(flux_vae_config("tiny"), ByteTextTokenizerConfig(), "byte", backbone, head)


@register_model("nextstep_1_large")
def nextstep_1_large(tokenizer_path: str = "") -> ModelConfig:
    """The published NextStep-1-Large shapes: Qwen2.5-14B backbone, base flow head, FLUX VAE.

    Args:
        tokenizer_path: a local Qwen2.5 / NextStep tokenizer directory.
    """
    backbone = Qwen2BackboneConfig()
    return compose(flux_vae_config("flux"), HFTextTokenizerConfig(path=tokenizer_path), "huggingface",
                   backbone, flow_head_config("base", backbone.hidden_size))
