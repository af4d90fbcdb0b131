"""Interoperability: the published NextStep-1 checkpoints, Qwen2.5 initialisation, format conversion.

* `load_release_checkpoint` / `save_release_checkpoint`: the release's model
  directory (``config.json`` with ``model_type`` ``nextstep``, sharded safetensors
  without a ``model.`` prefix, tokenizer files, ``vae/``).
* `nextstep_from_qwen`: a new model whose language model is a Qwen2 / Qwen2.5 checkpoint.
* `detect_model_layout` / `load_model_directory`: what `NextStep.from_pretrained` uses to
  accept either layout.
"""

from nextstep.interop.layout import LAYOUTS, detect_model_layout, load_model_directory
from nextstep.interop.qwen_init import initialize_rows_from_mean, nextstep_from_qwen
from nextstep.interop.release_checkpoint import (
    load_release_checkpoint,
    model_key_to_release_key,
    release_key_to_model_key,
    save_release_checkpoint,
)
from nextstep.interop.release_config import (
    RELEASE_FIELDS,
    model_config_from_release,
    read_release_config,
    release_config_from_model,
)

__all__ = [
    "LAYOUTS",
    "RELEASE_FIELDS",
    "detect_model_layout",
    "initialize_rows_from_mean",
    "load_model_directory",
    "load_release_checkpoint",
    "model_config_from_release",
    "model_key_to_release_key",
    "nextstep_from_qwen",
    "read_release_config",
    "release_config_from_model",
    "release_key_to_model_key",
    "save_release_checkpoint",
]
