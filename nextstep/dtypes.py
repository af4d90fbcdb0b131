"""The floating dtypes a model's weights are held in, and their names in configs and on the command line."""

from __future__ import annotations

import torch

#: Name -> dtype of the floating dtypes models are built, loaded and converted in.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
