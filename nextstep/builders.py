"""Build a `nextstep.model.NextStep` from a `nextstep.model_config.ModelConfig`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from nextstep.config import ComponentSpec
from nextstep.devices import available_device
from nextstep.dtypes import weight_dtype
from nextstep.generation import check_seed
from nextstep.io import names_a_path, what_is_at
from nextstep.model import NextStep
from nextstep.model_config import ModelConfig
from nextstep.registry import component_class, model_names, model_preset


def build_component(spec: ComponentSpec, *, base_dir: Path | None = None):
    """Instantiate the registered class of ``spec`` with its config.

    Text tokenizers also receive ``base_dir`` (where their files may live).

    Raises:
        ValueError: an unknown name, or a config that is not the registered class's ``config_class``.
    """
    cls = component_class(spec.kind, spec.type)
    if not isinstance(spec.config, cls.config_class):
        raise ValueError(f"{spec.kind} {spec.type!r} ({cls.__name__}) takes a {cls.config_class.__name__}, found "
                         f"{type(spec.config).__name__}")
    if spec.kind == "text_tokenizer":
        return cls(spec.config, base_dir=base_dir)
    return cls(spec.config)


def build_model(
    config: ModelConfig | str,
    *,
    base_dir: Path | None = None,
    with_text_tokenizer: bool = True,
    seed: int | None = None,
) -> NextStep:
    """Build a model from a config or a preset name.

    Construct inside ``with torch.device("meta"):`` to get shapes without memory.

    Args:
        config: a `ModelConfig` or a registered preset name (``"tiny"``).
        base_dir: where relative tokenizer paths are resolved.
        with_text_tokenizer: set False to skip loading tokenizer files (inspection).
        seed: seed the initialisation, for reproducible random models.
    """
    if seed is not None:
        check_seed(seed)
    if isinstance(config, str):
        config = model_preset(config)()
    if not isinstance(config, ModelConfig):
        raise TypeError(f"build_model expects a ModelConfig or a preset name, found {type(config).__name__} "
                        "(a config read from JSON: ModelConfig.from_dict(data))")
    if seed is not None:
        torch.manual_seed(seed)
    text_tokenizer = build_component(config.text_tokenizer, base_dir=base_dir) if with_text_tokenizer else None
    return NextStep(
        image_tokenizer=build_component(config.image_tokenizer),
        text_tokenizer=text_tokenizer,
        backbone=build_component(config.backbone),
        image_head=build_component(config.image_head),
        sampler=build_component(config.sampler),
        config=config,
    )


def check_preset_name(name: str) -> None:
    """Refuse what names neither a model directory nor a shipped model, when it is not a preset either.

    Raises:
        FileNotFoundError: a path (with a separator or a suffix) at which there is no directory.
        ValueError: an unknown name, listing the shipped models and presets.
    """
    from nextstep.pretrained import bundled_models

    if names_a_path(name):
        raise FileNotFoundError(f"expected a model directory at {name!r}, found {what_is_at(name)}")
    if name not in model_names():
        raise ValueError(f"unknown model {name!r}: expected a model directory, a shipped model "
                         f"{bundled_models()} or a preset {model_names()} (a preset of your own is known once the "
                         "module that registers it with register_model is imported; on the command line: "
                         "--import MODULE)")


def load_model(name_or_path: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
               seed: int = 0) -> NextStep:
    """A saved model directory, a shipped model's name (`nextstep.pretrained`), or a preset
    name built with random weights under ``seed``."""
    from nextstep.pretrained import model_directory

    if not isinstance(name_or_path, (str, Path)):
        raise TypeError(f"load_model expects a model directory, a shipped model's name or a preset name, found "
                        f"{type(name_or_path).__name__}")
    name_or_path = str(name_or_path)
    if not name_or_path.strip():
        raise ValueError("load_model expects a model directory, a shipped model's name or a preset name, found "
                         f"{name_or_path!r}")
    device = available_device(device)
    dtype = weight_dtype(dtype)
    check_seed(seed)
    directory = model_directory(name_or_path)
    if directory is not None:
        return NextStep.from_pretrained(directory, device=device, dtype=dtype)
    check_preset_name(name_or_path)
    model = build_model(name_or_path, seed=seed)
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)


def model_config_part(source: Path | Callable[..., ModelConfig], part: str, release_part: Any,
                      **preset_arguments: Any) -> Any:
    """The field ``part`` of a model's `ModelConfig`, read without loading any weights: from a saved model
    directory's ``config.json``, ``release_part`` for a release directory, or from a preset (a function
    returning a `ModelConfig`) called with ``preset_arguments``."""
    from nextstep.interop.layout import NATIVE, detect_model_layout
    from nextstep.serialization import CONFIG_NAME

    if not isinstance(source, Path):
        return getattr(source(**preset_arguments), part)
    if detect_model_layout(source) == NATIVE:
        return getattr(ModelConfig.load(source / CONFIG_NAME), part)
    return release_part


def model_sampler_spec(name_or_path: str) -> ComponentSpec:
    """The default sampler (a `ComponentSpec`) of what `load_model` would load for ``name_or_path``, read from
    its config without loading any weights (`model_config_part`; a release directory's: the first release's)."""
    from nextstep.interop.release_config import release_sampler
    from nextstep.pretrained import model_directory

    directory = model_directory(str(name_or_path))
    if directory is None:
        check_preset_name(str(name_or_path))
    return model_config_part(directory or model_preset(str(name_or_path)), "sampler", release_sampler(None))
