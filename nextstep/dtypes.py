"""The floating dtypes a model's weights are held in, and their names in configs and on the command line."""

from __future__ import annotations

import contextlib

import torch

#: Name -> dtype of the floating dtypes models are built, loaded and converted in.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_integer_dtype(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` holds integers (not floating, complex or bool), as indices and positions need."""
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def check_input_dtype(inputs: torch.Tensor, weights: torch.dtype, what: str, owner: str) -> None:
    """Raise ``ValueError`` when ``inputs`` are not in the ``weights`` dtype of the module ``owner`` that
    takes them, outside autocast (which casts for the module); ``what`` names the inputs."""
    if inputs.dtype == weights:
        return
    if inputs.device.type != "meta" and torch.is_autocast_enabled(inputs.device.type):
        return
    raise ValueError(f"{what} are {inputs.dtype} but {owner} weights {weights}; cast the {what} (or the weights) "
                     "to one dtype, or run under torch.autocast")


def weight_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``dtype`` as a torch dtype of `DTYPES` (given as one or by name); None stays None.

    Raises:
        ValueError: anything else, naming the dtypes accepted.
    """
    if dtype is None:
        return None
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    raise ValueError(f"dtype must be one of {list(DTYPES)} (a torch dtype or its name), found {dtype!r}")


def without_autocast(device_type: str):
    """A context that turns autocast off on ``device_type`` where it is on (nothing to do elsewhere)."""
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
