"""``save_pretrained`` / ``from_pretrained``: ``config.json`` + ``model.safetensors`` (+ tokenizer files)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from nextstep.io import atomic_directory
from nextstep.model_config import ModelConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def save_pretrained(model, directory: Path) -> None:
    """Write the model to ``directory``; an existing directory is replaced atomically."""
    with atomic_directory(directory) as staging:
        if model.text_tokenizer is not None:
            model.text_tokenizer.save(staging)
        config = model.current_config()
        config.save(staging / CONFIG_NAME)
        state = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
        save_file(state, str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
    model.config = config


def read_safetensors(path: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing or corrupt file raises an error naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"expected weights at {path}, found nothing")
    try:
        state = {}
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            for name in handle.keys():
                # A fresh (aligned) copy: views into the mapped file can take slower,
                # numerically different kernel paths than ordinary allocations.
                state[name] = handle.get_tensor(name).clone()
        return state
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error})") from error


def check_state_dict(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], source: str) -> None:
    """Raise ``ValueError`` listing missing, unexpected and mis-shaped keys."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mis_shaped = [
        f"{name}: expected {tuple(expected[name].shape)}, found {tuple(found[name].shape)}"
        for name in sorted(set(expected) & set(found))
        if tuple(expected[name].shape) != tuple(found[name].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if mis_shaped:
        problems.append(f"mis-shaped keys [{'; '.join(mis_shaped)}]")
    if problems:
        raise ValueError(f"weights in {source} do not match the model: " + ", ".join(problems))


def load_pretrained(directory: Path, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
    """Rebuild a model saved by `save_pretrained` (config first, then weights)."""
    from nextstep.builders import build_model

    if not directory.is_dir():
        raise FileNotFoundError(f"expected a model directory at {directory}, found nothing")
    config = ModelConfig.load(directory / CONFIG_NAME)
    with torch.device("meta"):
        model = build_model(config, base_dir=directory)
    state = read_safetensors(directory / WEIGHTS_NAME, device=device)
    check_state_dict(model.state_dict(), state, str(directory / WEIGHTS_NAME))
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    materialize_buffers(model, device)
    return model


def materialize_buffers(model: torch.nn.Module, device: torch.device | str) -> None:
    """Recreate non-persistent buffers left on the meta device after ``assign`` loading."""
    for module in model.modules():
        if hasattr(module, "reset_buffers"):
            for name, buffer in list(module.named_buffers(recurse=False)):
                if buffer.is_meta:
                    module.register_buffer(name, torch.empty(buffer.shape, dtype=buffer.dtype,
                                                             device=device), persistent=False)
            module.reset_buffers()
    leftovers = [name for name, b in model.named_buffers() if b.is_meta]
    leftovers += [name for name, p in model.named_parameters() if p.is_meta]
    if leftovers:
        raise RuntimeError(f"tensors left uninitialised after loading: {leftovers}")
