"""The published NextStep-1 ``config.json`` <-> `nextstep.model_config.ModelConfig`, field by field.

The release describes a model with one Llama-style Hugging Face config
(``model_type`` ``"nextstep"``) plus NextStep fields, and its tokenizer with a
separate ``vae/config.json``. `RELEASE_FIELDS` lists where every release field
goes; `model_config_from_release` and `release_config_from_model` apply it in
each direction.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

from nextstep.backbones.qwen2 import Qwen2BackboneConfig
from nextstep.backbones.qwen2_checkpoint import config_flag, qwen2_config_from_hf
from nextstep.config import ComponentSpec, Config, as_integer, described
from nextstep.generation_defaults import GenerationDefaults
from nextstep.heads.flow_matching import FlowMatchingHeadConfig
from nextstep.io import read_json_object
from nextstep.model_config import ModelConfig
from nextstep.samplers.euler_maruyama import EulerMaruyamaSamplerConfig
from nextstep.tokenizers.base import TextTokenizer
from nextstep.tokenizers.flux_vae import FluxVAEConfig
from nextstep.tokenizers.hf_text import HFTextTokenizerConfig
from nextstep.tokenizers.special_tokens import BEGIN_OF_IMAGE, END_OF_IMAGE, IMAGE_PLACEHOLDER, PAD

CONFIG_NAME = "config.json"
RELEASE_MODEL_TYPE = "nextstep"

#: Release ``config.json`` field -> where its value lives in a `ModelConfig`
#: (``component.field``), or how it is used when it has no place there.
RELEASE_FIELDS: dict[str, str] = {
    "vocab_size": "backbone.vocab_size",
    "hidden_size": "backbone.hidden_size (and image_head.condition_dim)",
    "intermediate_size": "backbone.intermediate_size",
    "num_hidden_layers": "backbone.num_layers",
    "num_attention_heads": "backbone.num_heads",
    "num_key_value_heads": "backbone.num_kv_heads",
    "head_dim": "backbone.head_dim (None when hidden_size / num_attention_heads)",
    "rope_theta": "backbone.rope_theta",
    "rms_norm_eps": "backbone.rms_norm_eps",
    "attention_bias": "backbone.attention_bias (q/k/v projections)",
    "o_attention_bias": "backbone.output_attention_bias (follows attention_bias when absent)",
    "hidden_act": "checked: must be silu",
    "mlp_bias": "checked: must be false",
    "rope_scaling": "checked: must be null (or default rope)",
    "tie_word_embeddings": "tie_word_embeddings",
    "latent_channels": "image_tokenizer.z_channels (checked against vae/config.json)",
    "latent_patch_size": "image_tokenizer.patch_size",
    "fm_head_dim": "image_head.width",
    "fm_head_layers": "image_head.depth",
    "fm_head_batch_mul": "image_head.batch_mul",
    "lm_loss_weight": "text_loss_weight",
    "im_loss_weight": "image_loss_weight",
    "boi": f"checked: id of {BEGIN_OF_IMAGE} in the tokenizer",
    "eoi": f"checked: id of {END_OF_IMAGE} in the tokenizer",
    "image_placeholder_id": f"checked: id of {IMAGE_PLACEHOLDER} in the tokenizer",
    "pad_token_id_added": f"checked: id of {PAD} in the tokenizer",
    "use_gen_pos_embed": "checked: must be false (the 2-D position table is unused in the release)",
    "vae_name_or_path": "where the image tokenizer is looked for when there is no vae/ folder",
    "latent_size": "informational; kept in release_fields and written back (32 when the model has none)",
    "max_position_embeddings": "informational (positions are rotary); kept in release_fields and written back",
    "initializer_range": "informational; kept in release_fields and written back",
    "bos_token_id": "informational; kept in release_fields and written back",
    "pad_token_id": "informational (pad_token_id_added is the pad id); kept in release_fields and written back",
    "auto_map": "informational (the classes a trust_remote_code loader imports); kept in release_fields and "
                "written back",
    "model_type": "checked: must be nextstep",
}

#: Hugging Face bookkeeping fields that do not change the computation.
IGNORED_FIELDS: tuple[str, ...] = (
    "_name_or_path", "architectures", "torch_dtype", "dtype", "transformers_version",
    "use_cache", "pretraining_tp", "attention_dropout", "eos_token_id", "max_window_layers", "use_sliding_window",
    "sliding_window", "layer_types", "rope_parameters",
)

#: Release fields without effect here that a model keeps (`ModelConfig.release_fields`) to write them back.
KEPT_RELEASE_FIELDS = ("latent_size", "max_position_embeddings", "initializer_range", "bos_token_id", "pad_token_id",
                       "auto_map")

#: Default values of the NextStep fields (those of the release's config class).
RELEASE_DEFAULTS: dict[str, Any] = {
    "latent_size": 32, "latent_patch_size": 2, "latent_channels": 16, "lm_loss_weight": 0.01,
    "im_loss_weight": 1.0, "fm_head_dim": 1536, "fm_head_layers": 12, "fm_head_batch_mul": 4,
    "use_gen_pos_embed": False,
}

#: What a release model generates when a call leaves the settings unset: the release examples'
#: 512x512 images with CFG 7.5 and 50 head steps.
RELEASE_GENERATION = GenerationDefaults(cfg=7.5, num_steps=50, height=512, width=512)
#: The flow head's MLP ratio and time-code size, fixed in the release.
RELEASE_HEAD_MLP_RATIO = 1.0
RELEASE_HEAD_FREQUENCY_DIM = 256
#: GroupNorm groups of the release's VAE (not stored in its config).
RELEASE_VAE_NORM_GROUPS = 32
#: The flow head's training times, fixed in the release: logit-normal(0, 1), no shift.
RELEASE_HEAD_TIMES: dict[str, Any] = {"time_sampling": "logit_normal", "time_mean": 0.0, "time_std": 1.0,
                                      "time_shift": 1.0}
#: Chance of an image-first training pair in the release (text dropout for guidance).
RELEASE_IMAGE_FIRST_PROBABILITY = 0.3


def read_release_config(path: str | Path) -> dict[str, Any]:
    """The parsed release ``config.json`` of a model directory, checked to be a NextStep one.

    Args:
        path: the model directory (or its ``config.json``).

    Raises:
        FileNotFoundError: when there is no ``config.json``.
        ValueError: for invalid JSON or a ``model_type`` other than ``nextstep``.
    """
    path = Path(path)
    config_path = path / CONFIG_NAME if path.is_dir() else path
    data = read_json_object(config_path, f"NextStep release {CONFIG_NAME}")
    if data.get("model_type") != RELEASE_MODEL_TYPE:
        raise ValueError(
            f"{config_path} has model_type {data.get('model_type')!r}; a NextStep release config has "
            f"model_type {RELEASE_MODEL_TYPE!r}"
        )
    return data


def release_field(release: dict[str, Any], name: str) -> Any:
    """A NextStep field of the release config, or the release's default for it."""
    return release.get(name, RELEASE_DEFAULTS.get(name))


def release_integer(release: dict[str, Any], name: str) -> int:
    """An integer field of the release config (or the release's default for it); anything else raises
    ``ValueError`` naming the field and what it holds."""
    value = release_field(release, name)
    if as_integer(value) is None:
        raise ValueError(f"{name} in the model config must be an integer, found {described(value)}")
    return as_integer(value)


def check_release_config(release: dict[str, Any]) -> None:
    """Refuse release settings this library does not implement.

    Raises:
        ValueError: naming the field and its value.
    """
    if config_flag(release, "use_gen_pos_embed", RELEASE_DEFAULTS["use_gen_pos_embed"]):
        raise ValueError(
            "use_gen_pos_embed must be false, found true: the release's additive 2-D position table "
            "for image tokens is not implemented"
        )
    if config_flag(release, "mlp_bias", False):
        raise ValueError("mlp_bias must be false (Qwen2 MLPs have no bias), found true")


def unknown_release_fields(release: dict[str, Any]) -> list[str]:
    """Fields of a release config that are neither mapped (`RELEASE_FIELDS`) nor known bookkeeping."""
    return sorted(set(release) - set(RELEASE_FIELDS) - set(IGNORED_FIELDS))


def backbone_config_from_release(release: dict[str, Any], **overrides: Any) -> Qwen2BackboneConfig:
    """`Qwen2BackboneConfig` from the Llama-style fields (biases from ``attention_bias`` / ``o_attention_bias``)."""
    return qwen2_config_from_hf(release, **overrides)


def head_config_from_release(release: dict[str, Any]) -> FlowMatchingHeadConfig:
    """`FlowMatchingHeadConfig` from ``fm_head_*``, ``latent_*`` and ``hidden_size``."""
    channels = release_integer(release, "latent_channels")
    patch = release_integer(release, "latent_patch_size")
    return FlowMatchingHeadConfig(
        token_dim=channels * patch * patch,
        condition_dim=release_integer(release, "hidden_size"),
        width=release_integer(release, "fm_head_dim"),
        depth=release_integer(release, "fm_head_layers"),
        mlp_ratio=RELEASE_HEAD_MLP_RATIO,
        frequency_dim=RELEASE_HEAD_FREQUENCY_DIM,
        batch_mul=release_integer(release, "fm_head_batch_mul"),
    )


def image_tokenizer_config_for_release(release: dict[str, Any], vae: FluxVAEConfig) -> FluxVAEConfig:
    """The VAE config with the release's patch size, after checking its channel count.

    Raises:
        ValueError: when ``latent_channels`` differs from the VAE's ``z_channels``.
    """
    channels = release_integer(release, "latent_channels")
    if channels != vae.z_channels:
        raise ValueError(
            f"latent_channels in the model config is {channels} but the VAE config has "
            f"z_channels={vae.z_channels}; the model and its vae/ folder do not belong together"
        )
    return vae.replace(patch_size=release_integer(release, "latent_patch_size"))


def check_special_token_ids(release: dict[str, Any], text_tokenizer: TextTokenizer) -> None:
    """Check ``boi``, ``eoi``, ``image_placeholder_id`` and ``pad_token_id_added`` against the tokenizer.

    Raises:
        ValueError: naming the field, the config's id and the tokenizer's id.
    """
    for field, token in (("boi", BEGIN_OF_IMAGE), ("eoi", END_OF_IMAGE),
                         ("image_placeholder_id", IMAGE_PLACEHOLDER), ("pad_token_id_added", PAD)):
        expected = release.get(field)
        if expected is None:
            continue
        found = text_tokenizer.special_token_id(token)
        if as_integer(expected) is None:
            raise ValueError(f"{field} in the model config must be an integer id, found {described(expected)}")
        if expected != found:
            raise ValueError(
                f"{field} is {expected} in the model config but the tokenizer gives {token} the id {found}; "
                "the tokenizer files do not belong to these weights"
            )


def release_sampler(sampler: ComponentSpec | str | None) -> ComponentSpec:
    """A model's default sampler as given: a spec, a registered sampler's name (its default config: ``flow_sde``
    for NextStep-1.1's ``sde`` mode, ``euler`` for its ``ode`` mode), or None for the first release's
    Euler-Maruyama sampler."""
    if sampler is None:
        return ComponentSpec("sampler", "euler_maruyama", EulerMaruyamaSamplerConfig())
    if isinstance(sampler, str):
        return ComponentSpec.named("sampler", sampler)
    if not isinstance(sampler, ComponentSpec):
        raise ValueError(f"sampler must be a ComponentSpec, a registered sampler's name or None, found "
                         f"{type(sampler).__name__}")
    return sampler


def model_config_from_release(
    release: dict[str, Any],
    vae: FluxVAEConfig,
    tokenizer_path: str,
    *,
    sampler: ComponentSpec | str | None = None,
    use_norm: bool = True,
    **backbone_overrides: Any,
) -> ModelConfig:
    """A `ModelConfig` describing the same model as a release config, generating by default as the
    release examples do (`RELEASE_GENERATION`).

    Args:
        release: the parsed release ``config.json``.
        vae: the image tokenizer's config (from ``vae/config.json``).
        tokenizer_path: directory of the Hugging Face tokenizer files.
        sampler: default sampler; None selects the first release's
            Euler-Maruyama sampler.
        use_norm: LayerNorm each sampled token (the release examples pass
            ``use_norm=True``).
        **backbone_overrides: `Qwen2BackboneConfig` fields to set (for example
            ``attention_backend``).

    Raises:
        ValueError: for a release setting that is not implemented, naming it.

    A field that is neither mapped nor known bookkeeping raises a warning naming it.
    """
    check_release_config(release)
    unknown = unknown_release_fields(release)
    if unknown:
        warnings.warn(f"NextStep release config has fields this library does not know and ignores: {unknown}",
                      stacklevel=2)
    backbone = backbone_config_from_release(release, **backbone_overrides)
    sampler = release_sampler(sampler)
    return ModelConfig(
        image_tokenizer=ComponentSpec("image_tokenizer", "flux_vae", image_tokenizer_config_for_release(release, vae)),
        text_tokenizer=ComponentSpec("text_tokenizer", "huggingface", HFTextTokenizerConfig(path=tokenizer_path)),
        backbone=ComponentSpec("backbone", "qwen2", backbone),
        image_head=ComponentSpec("image_head", "flow_matching", head_config_from_release(release)),
        sampler=sampler,
        tie_word_embeddings=config_flag(release, "tie_word_embeddings", False),
        text_loss_weight=float(release_field(release, "lm_loss_weight")),
        image_loss_weight=float(release_field(release, "im_loss_weight")),
        image_first_probability=RELEASE_IMAGE_FIRST_PROBABILITY,
        release_fields={name: release[name] for name in KEPT_RELEASE_FIELDS if name in release},
        use_norm=use_norm,
        generation=RELEASE_GENERATION,
    )


def _component_config(spec: ComponentSpec, expected_type: str, cls: type[Config]) -> Config:
    if spec.type != expected_type or not isinstance(spec.config, cls):
        raise ValueError(
            f"the release layout stores a {expected_type!r} {spec.kind}, found {spec.type!r}; "
            "save this model with save_pretrained instead"
        )
    return spec.config


def settings_the_release_drops(config: ModelConfig) -> list[str]:
    """Settings of ``config`` that a model loaded from the release layout would not have, each as
    ``name=value (it loads as value)``: the default sampler, ``use_norm``, the generation defaults,
    ``image_first_probability`` and ``distilled_head``, which the release ``config.json`` has no field for."""
    default_sampler = ComponentSpec("sampler", "euler_maruyama", EulerMaruyamaSamplerConfig())
    dropped = []
    if config.sampler.type != default_sampler.type:
        dropped.append(f"sampler {config.sampler.type!r} (it loads as {default_sampler.type!r})")
    elif config.sampler.config != default_sampler.config:
        dropped += _differences("sampler", config.sampler.config, default_sampler.config)
    if not config.use_norm:
        dropped.append(f"use_norm={config.use_norm!r} (it loads as True)")
    dropped += _differences("generation", config.generation, RELEASE_GENERATION)
    if config.image_first_probability != RELEASE_IMAGE_FIRST_PROBABILITY:
        dropped.append(f"image_first_probability={config.image_first_probability!r} "
                       f"(it loads as {RELEASE_IMAGE_FIRST_PROBABILITY!r})")
    if config.distilled_head:
        dropped.append(f"distilled_head={config.distilled_head!r} (it loads as none: generation no longer "
                       "warns when the distilled head is sampled otherwise)")
    return dropped


def _differences(prefix: str, mine: Config, theirs: Config) -> list[str]:
    """``prefix.field=mine (it loads as theirs)`` for each field where two configs of one class differ."""
    return [f"{prefix}.{field.name}={getattr(mine, field.name)!r} (it loads as {getattr(theirs, field.name)!r})"
            for field in dataclasses.fields(mine)  # type: ignore[arg-type]
            if getattr(mine, field.name) != getattr(theirs, field.name)]


def release_config_from_model(
    config: ModelConfig, text_tokenizer: TextTokenizer, *, torch_dtype: str = "bfloat16"
) -> dict[str, Any]:
    """The release ``config.json`` for a model (the inverse of `model_config_from_release`).

    Settings that change how the model generates but that the release has no
    field for (`settings_the_release_drops`) raise a warning naming each.

    Args:
        config: the model's config (from ``NextStep.current_config()``).
        text_tokenizer: supplies the special-token ids and the end-of-text id.
        torch_dtype: the ``torch_dtype`` entry (the dtype of the written weights).

    Raises:
        ValueError: naming the first setting the release format cannot express
            (word vectors, a flow head trained with other times, ...).
    """
    backbone = _component_config(config.backbone, "qwen2", Qwen2BackboneConfig)
    head = _component_config(config.image_head, "flow_matching", FlowMatchingHeadConfig)
    vae = _component_config(config.image_tokenizer, "flux_vae", FluxVAEConfig)
    if head.mlp_ratio != RELEASE_HEAD_MLP_RATIO:
        raise ValueError(f"image_head.mlp_ratio must be {RELEASE_HEAD_MLP_RATIO} for the release layout, "
                         f"found {head.mlp_ratio}")
    if head.frequency_dim != RELEASE_HEAD_FREQUENCY_DIM:
        raise ValueError(f"image_head.frequency_dim must be {RELEASE_HEAD_FREQUENCY_DIM} for the release layout, "
                         f"found {head.frequency_dim}")
    if vae.norm_groups != RELEASE_VAE_NORM_GROUPS:
        raise ValueError(f"image_tokenizer.norm_groups must be {RELEASE_VAE_NORM_GROUPS} for the release layout "
                         f"(its VAE config has no such field), found {vae.norm_groups}")
    if not vae.symmetric:
        raise ValueError(f"image_tokenizer.decoder_ch must equal ch ({vae.ch}) and decoder_norm_groups "
                         f"norm_groups for the release layout (its VAE config has one width), found "
                         f"decoder_ch {vae.decoder_ch} and decoder_norm_groups {vae.decoder_norm_groups}")
    for name, expected in RELEASE_HEAD_TIMES.items():
        if getattr(head, name) != expected:
            raise ValueError(f"image_head.{name} must be {expected!r} for the release layout (its flow head trains "
                             f"with logit-normal(0, 1) times, no shift), found {getattr(head, name)!r}")
    if config.word_vectors.count:
        raise ValueError(f"word_vectors must be none for the release layout (it has no place for them), found "
                         f"count {config.word_vectors.count}; save this model with save_pretrained instead")
    if head.token_dim != vae.z_channels * vae.patch_size**2:
        raise ValueError(f"image_head.token_dim {head.token_dim} differs from z_channels * patch_size**2 = "
                         f"{vae.z_channels * vae.patch_size**2}")
    kept = config.release_fields
    dropped = settings_the_release_drops(config)
    if dropped:
        warnings.warn(f"the release layout does not keep {', '.join(dropped)}; pass sampler= and use_norm= to "
                      "load_release_checkpoint, or generation settings to generate, to use them again",
                      stacklevel=2)
    return {
        "architectures": ["NextStep"],
        "model_type": RELEASE_MODEL_TYPE,
        "vocab_size": backbone.vocab_size,
        "hidden_size": backbone.hidden_size,
        "intermediate_size": backbone.intermediate_size,
        "num_hidden_layers": backbone.num_layers,
        "num_attention_heads": backbone.num_heads,
        "num_key_value_heads": backbone.num_kv_heads,
        "head_dim": backbone.resolved_head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": backbone.rms_norm_eps,
        "rope_theta": backbone.rope_theta,
        "rope_scaling": None,
        "attention_bias": backbone.attention_bias,
        "o_attention_bias": backbone.output_attention_bias,
        "mlp_bias": False,
        "tie_word_embeddings": config.tie_word_embeddings,
        "torch_dtype": torch_dtype,
        "eos_token_id": text_tokenizer.eos_id,
        **{name: kept[name] for name in KEPT_RELEASE_FIELDS if name in kept and name != "latent_size"},
        "vae_name_or_path": "vae",
        "latent_size": kept.get("latent_size", RELEASE_DEFAULTS["latent_size"]),
        "latent_patch_size": vae.patch_size,
        "latent_channels": vae.z_channels,
        "boi": text_tokenizer.begin_of_image_id,
        "eoi": text_tokenizer.end_of_image_id,
        "image_placeholder_id": text_tokenizer.image_placeholder_id,
        "pad_token_id_added": text_tokenizer.pad_id,
        "lm_loss_weight": config.text_loss_weight,
        "im_loss_weight": config.image_loss_weight,
        "fm_head_dim": head.width,
        "fm_head_layers": head.depth,
        "fm_head_batch_mul": head.batch_mul,
        "use_gen_pos_embed": False,
    }
