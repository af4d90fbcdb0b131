"""Hugging Face Qwen2 / Qwen2.5 checkpoints: config translation and streaming loading.

A Hugging Face checkpoint directory holds ``config.json`` and safetensors
weights, one file or shards with ``model.safetensors.index.json``. Keys carry a
``model.`` prefix (``model.layers.0.self_attn.q_proj.weight``) in
``Qwen2ForCausalLM`` checkpoints and none in ``Qwen2Model`` ones; both load.
``lm_head.weight`` belongs to the LM head, not the backbone
(`load_qwen2_lm_head`); it is absent when the embeddings are tied. A NextStep
release checkpoint also holds the image parts: it loads whole through
`nextstep.interop.release_checkpoint.load_release_checkpoint`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from nextstep.backbones.qwen2 import Qwen2Backbone, Qwen2BackboneConfig
from nextstep.config import described
from nextstep.heads.lm_head import LMHead
from nextstep.io import read_json_object
from nextstep.weights import load_safetensors, read_checkpoint_index

CONFIG_NAME = "config.json"
LM_HEAD_KEY = "lm_head.weight"
#: ``model_type`` values whose decoder is the Qwen2 architecture.
SUPPORTED_MODEL_TYPES = ("qwen2", "nextstep")


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint directory.

    Args:
        path: the checkpoint directory (or the ``config.json`` itself).
    """
    path = Path(path)
    return read_json_object(path / CONFIG_NAME if path.is_dir() else path, f"Hugging Face {CONFIG_NAME}")


def _required(hf_config: dict[str, Any], key: str) -> Any:
    if key not in hf_config:
        raise ValueError(f"Hugging Face config.json lacks the required key {key!r} (found keys "
                         f"{sorted(hf_config)[:12]}{'...' if len(hf_config) > 12 else ''})")
    return hf_config[key]


def config_flag(hf_config: dict[str, Any], key: str, default: bool) -> bool:
    """A true/false field of a ``config.json``: ``default`` when absent or null; a value that is not a JSON
    boolean (the string ``"false"`` among them) raises ``ValueError`` naming the field."""
    value = hf_config.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"config field {key!r} must be true or false, found {described(value)}")
    return value


def _rms_norm_eps(hf_config: dict[str, Any]) -> float:
    """``rms_norm_eps``: 1e-6 (Qwen2's default) when absent or null; a value that is not a positive number
    raises ``ValueError`` naming the field."""
    value = hf_config.get("rms_norm_eps")
    if value is None:
        return 1e-6
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"config field 'rms_norm_eps' must be a positive number, found {described(value)}")
    return float(value)


def _rope_theta(hf_config: dict[str, Any]) -> float:
    parameters = hf_config.get("rope_parameters") or {}
    scaling = hf_config.get("rope_scaling") or {}
    for table in (parameters, scaling):
        kind = table.get("rope_type", table.get("type", "default"))
        if kind not in (None, "default"):
            raise ValueError(f"rope type {kind!r} is not implemented by Qwen2Backbone; only 'default' rope is")
    theta = hf_config.get("rope_theta")
    if theta is None:
        theta = parameters.get("rope_theta", 10000.0)
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
        raise ValueError(f"rope_theta must be a positive number, found {theta!r}")
    return float(theta)


def _slides_some_layer(hf_config: dict[str, Any]) -> bool:
    """Whether transformers' Qwen2 would give some layer sliding-window attention: a ``layer_types`` entry
    says so, or (without ``layer_types``) ``use_sliding_window`` with a layer at or past ``max_window_layers``."""
    layer_types = hf_config.get("layer_types")
    if layer_types:
        return "sliding_attention" in layer_types
    if not config_flag(hf_config, "use_sliding_window", False):
        return False
    window_layers = hf_config.get("max_window_layers")
    layers = hf_config.get("num_hidden_layers")
    return not (isinstance(window_layers, int) and isinstance(layers, int) and window_layers >= layers)


def qwen2_config_from_hf(hf_config: dict[str, Any], **overrides: Any) -> Qwen2BackboneConfig:
    """Translate a Hugging Face config (``model_type`` ``qwen2`` or ``nextstep``).

    Args:
        hf_config: the parsed ``config.json``.
        **overrides: `Qwen2BackboneConfig` fields to set as well.

    Raises:
        ValueError: for an unsupported model type, activation, rope scaling,
            sliding-window attention or attention dropout, naming it.
    """
    model_type = hf_config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type must be one of {list(SUPPORTED_MODEL_TYPES)} for Qwen2Backbone, found {model_type!r}; "
            "use HFBackbone for other architectures"
        )
    activation = hf_config.get("hidden_act", "silu")
    if activation != "silu":
        raise ValueError(f"hidden_act must be 'silu' for Qwen2Backbone, found {activation!r}")
    if _slides_some_layer(hf_config):
        raise ValueError("sliding-window attention (use_sliding_window / layer_types) is not implemented "
                         "by Qwen2Backbone; use HFBackbone")
    dropout = hf_config.get("attention_dropout") or 0.0
    if dropout != 0.0:
        raise ValueError(f"attention_dropout must be 0 for Qwen2Backbone (it has no attention dropout), found "
                         f"{dropout!r}; use HFBackbone")
    hidden_size = _required(hf_config, "hidden_size")
    num_heads = _required(hf_config, "num_attention_heads")
    head_dim = hf_config.get("head_dim")
    if head_dim is not None and head_dim * num_heads == hidden_size:
        head_dim = None
    if model_type == "qwen2":
        attention_bias, output_bias = True, False
    else:  # NextStep's Llama-style config: no biases when absent (Llama's default), o follows q/k/v
        attention_bias = config_flag(hf_config, "attention_bias", False)
        output_bias = config_flag(hf_config, "o_attention_bias", attention_bias)  # absent or null: as q/k/v
    fields = dict(
        vocab_size=_required(hf_config, "vocab_size"),
        hidden_size=hidden_size,
        intermediate_size=_required(hf_config, "intermediate_size"),
        num_layers=_required(hf_config, "num_hidden_layers"),
        num_heads=num_heads,
        num_kv_heads=hf_config.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        rope_theta=_rope_theta(hf_config),
        rms_norm_eps=_rms_norm_eps(hf_config),
        attention_bias=attention_bias,
        output_attention_bias=output_bias,
    )
    fields.update(overrides)
    return Qwen2BackboneConfig(**fields)


def hf_config_from_qwen2(config: Qwen2BackboneConfig) -> dict[str, Any]:
    """The Hugging Face ``Qwen2Config`` fields describing the same decoder.

    Raises:
        ValueError: when the decoder's biases differ from Qwen2's (q/k/v bias, no output bias).
    """
    if not config.attention_bias or config.output_attention_bias:
        raise ValueError(
            "Hugging Face Qwen2 has q/k/v biases and no output bias; found "
            f"attention_bias={config.attention_bias}, output_attention_bias={config.output_attention_bias}"
        )
    return {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.resolved_head_dim,
        "hidden_act": "silu",
        "rope_theta": config.rope_theta,
        "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": 32768,
        "use_sliding_window": False,
        "tie_word_embeddings": False,
    }


def backbone_key(name: str) -> str | None:
    """Checkpoint name -> `Qwen2Backbone` parameter name; None for the LM head.

    Args:
        name: a key such as ``model.layers.0.mlp.up_proj.weight`` or ``norm.weight``.
    """
    if name == LM_HEAD_KEY:
        return None
    return name.removeprefix("model.")


def load_qwen2_backbone(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    **config_overrides: Any,
) -> Qwen2Backbone:
    """Build a `Qwen2Backbone` from a Hugging Face checkpoint directory, streaming its weights.

    The model is built on the meta device and each tensor is copied into freshly
    allocated parameters in ``dtype`` on ``device``, one shard at a time.

    Args:
        path: the checkpoint directory.
        dtype: parameter dtype (``torch.float32``, ``torch.bfloat16``, ``torch.float16``); None is float32.
        device: where the parameters are allocated.
        **config_overrides: `Qwen2BackboneConfig` fields to override.

    Returns:
        the backbone in eval mode.

    Raises:
        ValueError: when the weights do not match the config, naming every
            missing, unexpected and mis-shaped key with both shapes.
    """
    config = qwen2_config_from_hf(read_hf_config(path), **config_overrides)
    with torch.device("meta"):
        backbone = Qwen2Backbone(config)
    load_safetensors(backbone, path, rename=backbone_key, dtype=dtype or torch.float32, device=device)
    return backbone.eval()


def load_qwen2_lm_head(
    path: str | Path,
    backbone: Qwen2Backbone,
    *,
    dtype: torch.dtype | None = None,
) -> LMHead:
    """The LM head of a Hugging Face checkpoint: tied to ``backbone``'s embeddings, or its own ``lm_head.weight``.

    Args:
        path: the checkpoint directory.
        backbone: the backbone loaded from the same directory.
        dtype: weight dtype; None follows the backbone's embeddings.
    """
    config = read_hf_config(path)
    embeddings = backbone.input_embeddings()
    vocab_size, hidden_size = embeddings.weight.shape
    if config_flag(config, "tie_word_embeddings", False):
        return LMHead(hidden_size, vocab_size, tied_embedding=embeddings)
    if LM_HEAD_KEY not in read_checkpoint_index(path):
        raise ValueError(f"{path} has no {LM_HEAD_KEY!r}, which its config.json asks for (tie_word_embeddings is "
                         "false or absent, as Hugging Face reads it); set \"tie_word_embeddings\": true if the "
                         "LM head shares the input embeddings")
    with torch.device("meta"):
        head = LMHead(hidden_size, vocab_size)
    load_safetensors(head, path, rename=lambda name: "weight" if name == LM_HEAD_KEY else None,
                     dtype=dtype or embeddings.weight.dtype, device=embeddings.weight.device)
    return head.eval()
