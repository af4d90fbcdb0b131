"""``save_pretrained`` / ``from_pretrained``: ``config.json`` + ``model.safetensors`` (+ tokenizer files)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from nextstep.config import ComponentSpec
from nextstep.io import atomic_directory
from nextstep.model_config import ModelConfig
from nextstep.weights import key_problems, tensor_to_save

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def _under(name: str, prefix: str) -> bool:
    """Whether parameter ``name`` is ``prefix`` or lies inside it (whole dotted parts)."""
    return name == prefix or name.startswith(prefix + ".")


def _storage_dtype(name: str, storage_dtypes: dict[str, torch.dtype]) -> torch.dtype | None:
    """The dtype of the longest prefix in ``storage_dtypes`` that ``name`` lies under, if any."""
    prefixes = [prefix for prefix in storage_dtypes if _under(name, prefix)]
    return storage_dtypes[max(prefixes, key=len)] if prefixes else None


def write_config_and_tokenizer(model, directory: Path) -> ModelConfig:
    """Write ``config.json`` and the text tokenizer's files of ``model`` into ``directory``: what loading
    needs beside the weights. The file finds the tokenizer's files where ``directory`` holds them; returns
    the live components' config (`NextStep.current_config`)."""
    saved_text_config = model.text_tokenizer.save(directory) if model.text_tokenizer is not None else None
    config = written = model.current_config()
    if saved_text_config is not None:
        spec = config.text_tokenizer
        written = config.replace(text_tokenizer=ComponentSpec(spec.kind, spec.type, saved_text_config))
    written.save(Path(directory) / CONFIG_NAME)
    return config


def save_pretrained(model, directory: Path, *, storage_dtypes: dict[str, torch.dtype] | None = None,
                    extra_files: dict[str, str] | None = None) -> None:
    """Write the model to ``directory``; an existing directory is replaced atomically.

    Args:
        extra_files: file name -> text of further files written with the model (in the same
            atomic replacement, so that the folder never holds the model without them), such as
            a report of how it was made.
        storage_dtypes: parameter-name prefixes (whole dotted parts, e.g.
            ``"image_tokenizer.decoder"``) mapped to the floating dtype their
            tensors are stored in, to make the file smaller; the rest keep the
            model's dtype. A part of the file (the image tokenizer, or the rest
            of the model) with mixed dtypes loads in the dtype the model is
            built in (float32 by default). None (the default): those of the file
            the model was loaded from (``model.stored_dtypes``, set by
            `load_pretrained`), so that loading and saving keeps a float16
            decoder float16; ``{}`` stores everything in the model's dtypes.
    """
    weights = model.state_dict()
    if storage_dtypes is None:  # as the file it was loaded from stored it, where those parts still are
        storage_dtypes = {prefix: stored for prefix, stored in getattr(model, "stored_dtypes", {}).items()
                          if any(_under(name, prefix) for name in weights)}
    storage_dtypes = dict(storage_dtypes)
    extra_files = dict(extra_files or {})
    for name in extra_files:
        if not isinstance(name, str) or Path(name).name != name or name in (CONFIG_NAME, WEIGHTS_NAME):
            raise ValueError(f"extra_files must name plain files beside the model's own, found {name!r}")
    for prefix, dtype in storage_dtypes.items():
        if not any(_under(name, prefix) for name in weights):
            raise ValueError(f"storage_dtypes names {prefix!r}, which is no parameter or module of the model")
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"storage_dtypes[{prefix!r}] must be a floating torch.dtype, found {dtype!r}")
    with atomic_directory(directory) as staging:
        config = write_config_and_tokenizer(model, staging)
        state, saved = {}, set()
        for name, tensor in weights.items():
            # A tensor shared under two names (tied weights) is written once, under its first name;
            # loading fills every name of it.
            key = (tensor.device, tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
            if tensor.numel() and key in saved:
                continue
            saved.add(key)
            dtype = _storage_dtype(name, storage_dtypes) if tensor.is_floating_point() else None
            state[name] = tensor_to_save(tensor, dtype)
        save_file(state, str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
        for name, text in extra_files.items():
            (staging / name).write_text(text)
    model.config = config  # the live components' (the saved file may name the tokenizer's copy)


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


def check_state_dict(expected: dict, found: dict, source: str, what: str = "the model") -> None:
    """Raise ``ValueError`` listing missing, unexpected and mis-shaped keys.

    Args:
        expected: name -> tensor or shape tuple that ``what`` needs.
        found: name -> tensor or shape tuple that ``source`` holds.
        source: the file or directory, for the message.
        what: what the weights were meant for, for the message.
    """
    expected = {name: tuple(getattr(v, "shape", v)) for name, v in expected.items()}
    found = {name: tuple(getattr(v, "shape", v)) for name, v in found.items()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mis_shaped = [
        f"{name}: expected {expected[name]}, found {found[name]}"
        for name in sorted(set(expected) & set(found))
        if expected[name] != found[name]
    ]
    if missing or unexpected or mis_shaped:
        raise ValueError(f"weights in {source} do not match {what}: {key_problems(missing, unexpected, mis_shaped)}")


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def load_pretrained(directory: Path, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
    """Rebuild a model saved by `save_pretrained`: config first, then weights streamed into place.

    The model is built on the meta device and each tensor is copied from the
    file into freshly allocated memory, so loading needs about one model's worth
    of memory. ``dtype=None`` keeps the dtype the weights were saved in, for the image tokenizer and
    for the rest of the model each (a bfloat16 transformer beside a float32 VAE stays so); a part
    saved in several dtypes (``storage_dtypes``) loads in the dtype the model is built in.
    """
    from nextstep.builders import build_model
    from nextstep.weights import load_safetensors, read_checkpoint_index

    if not directory.is_dir():
        raise FileNotFoundError(f"expected a model directory at {directory}, found nothing")
    config = ModelConfig.load(directory / CONFIG_NAME)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"expected weights at {weights}, found nothing")
    infos = read_checkpoint_index(weights) if dtype is None else None  # the stored dtypes, when they are kept
    part_dtypes = None if infos is None else saved_part_dtypes(infos)
    with torch.device("meta"):
        model = build_model(config, base_dir=directory)
    if part_dtypes is not None:  # still on the meta device: this only sets the dtypes loading allocates
        built = torch.get_default_dtype()
        model.to(part_dtypes["model"] or built)
        model.image_tokenizer.to(part_dtypes["image_tokenizer"] or built)
    load_safetensors(model, weights, dtype=dtype, device=device)
    # Parts stored in another dtype than they load in (a float16 decoder of a float32 tokenizer) are saved so
    # again, unless a save says otherwise; none when a dtype was asked for.
    model.stored_dtypes = {} if infos is None else stored_dtypes(model.state_dict(), infos)
    return model


def stored_dtypes(state: dict[str, torch.Tensor], infos: dict) -> dict[str, torch.dtype]:
    """The `save_pretrained` ``storage_dtypes`` that store ``state`` as the file of ``infos`` stores it: each
    floating tensor saved in another dtype than it has in ``state``, under the shortest module prefix whose
    tensors are all stored so.

    Args:
        state: the loaded model's state dict.
        infos: the `nextstep.weights.TensorInfo` of each saved tensor, by name.
    """
    differing = {name: _SAFETENSORS_DTYPES[infos[name].dtype] for name, tensor in state.items()
                 if name in infos and tensor.is_floating_point() and infos[name].dtype in _SAFETENSORS_DTYPES
                 and _SAFETENSORS_DTYPES[infos[name].dtype] != tensor.dtype}
    chosen: dict[str, torch.dtype] = {}
    for name, stored in sorted(differing.items()):
        if any(_under(name, prefix) for prefix in chosen):
            continue
        parts = name.split(".")
        for length in range(1, len(parts) + 1):
            prefix = ".".join(parts[:length])
            under = [other for other in state if _under(other, prefix) and state[other].is_floating_point()]
            if all(differing.get(other) == stored for other in under):
                chosen[prefix] = stored
                break
    return chosen


def saved_part_dtypes(infos: dict) -> dict[str, torch.dtype | None]:
    """The floating dtype the image tokenizer's tensors were saved in (``"image_tokenizer"``), and the
    rest's (``"model"``); None for a part saved in several dtypes or none.

    Args:
        infos: the `nextstep.weights.TensorInfo` of each saved tensor, by name.
    """
    saved: dict[str, set[str]] = {"image_tokenizer": set(), "model": set()}
    for name, info in infos.items():
        if info.dtype in _SAFETENSORS_DTYPES:
            saved["image_tokenizer" if _under(name, "image_tokenizer") else "model"].add(info.dtype)
    return {part: _SAFETENSORS_DTYPES[next(iter(names))] if len(names) == 1 else None
            for part, names in saved.items()}
