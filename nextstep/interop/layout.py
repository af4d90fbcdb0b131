"""Which kind of model directory is this: the library's own, the NextStep-1 release, or a plain Qwen2?

`detect_model_layout` reads only ``config.json``; `load_model_directory` then
dispatches to the matching loader. `nextstep.model.NextStep.from_pretrained`
goes through here, so it accepts both NextStep layouts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from nextstep.devices import available_device
from nextstep.dtypes import weight_dtype
from nextstep.io import read_json_object, what_is_at
from nextstep.model_config import describes_a_model

if TYPE_CHECKING:
    from nextstep.model import NextStep

NATIVE = "native"
RELEASE = "release"
QWEN2 = "qwen2"
LAYOUTS = (NATIVE, RELEASE, QWEN2)

#: What each layout's directory holds, for error messages.
EXPECTED_FILES = (
    "this library's layout: config.json (a ModelConfig with image_tokenizer, text_tokenizer, backbone, "
    "image_head and sampler sections) + model.safetensors (+ tokenizer/); "
    "or the NextStep-1 release layout: config.json with model_type 'nextstep' + "
    "model.safetensors.index.json and model-*.safetensors shards (or one model.safetensors) + "
    "tokenizer.json / tokenizer_config.json + "
    "vae/config.json and vae/checkpoint.pt"
)


def detect_model_layout(directory: str | os.PathLike) -> str:
    """One of `LAYOUTS` for a model directory, from its ``config.json``.

    ``native`` configs have the component sections of a `ModelConfig`;
    ``release`` configs have ``model_type`` ``nextstep``; ``qwen2`` configs
    have ``model_type`` ``qwen2`` (a language model to initialise from).

    Raises:
        FileNotFoundError: for a missing directory or ``config.json``, saying
            which files each layout has.
        ValueError: for a ``config.json`` that matches no layout.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"expected a model directory at {directory}, found {what_is_at(directory)}")
    config_path = directory / "config.json"
    if not config_path.is_file():
        present = sorted(p.name for p in directory.iterdir())[:20]
        raise FileNotFoundError(
            f"{directory} is not a model directory: expected {EXPECTED_FILES}; found {present}"
        )
    data = read_json_object(config_path, "config.json")
    if describes_a_model(data):
        return NATIVE
    model_type = data.get("model_type")
    if model_type == "nextstep":
        return RELEASE
    if model_type == "qwen2":
        return QWEN2
    raise ValueError(
        f"{config_path} matches no known model layout (model_type {model_type!r}, keys "
        f"{sorted(data)[:12]}); expected {EXPECTED_FILES}"
    )


def load_model_directory(
    directory: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> "NextStep":
    """Load a model directory in either NextStep layout.

    Args:
        directory: a directory written by ``save_pretrained`` or a published
            NextStep-1 release directory.
        device: where the parameters are allocated.
        dtype: parameter dtype; None keeps the saved dtype.

    Raises:
        ValueError: for a plain Qwen2 directory (build a model from it with
            `nextstep.interop.qwen_init.nextstep_from_qwen`).
    """
    directory = Path(directory)
    device = available_device(device)
    dtype = weight_dtype(dtype)
    layout = detect_model_layout(directory)
    if layout == RELEASE:
        from nextstep.interop.release_checkpoint import load_release_checkpoint

        return load_release_checkpoint(directory, device=device, dtype=dtype)
    if layout == QWEN2:
        raise ValueError(
            f"{directory} is a plain Qwen2 language model, not a NextStep model; build one from it with "
            "nextstep.interop.nextstep_from_qwen(path, image_tokenizer=...) or `nextstep convert "
            f"{directory} OUT --vae VAE_DIR`"
        )
    from nextstep.serialization import load_pretrained

    return load_pretrained(directory, device=device, dtype=dtype)
