"""Which devices this machine has: a device name checked before anything is allocated on it."""

from __future__ import annotations

import torch


def _count(device_type: str) -> int | None:
    """Devices of ``device_type`` this machine has (None: a type whose devices torch cannot count)."""
    if device_type == "cuda":
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device_type == "mps":
        return 1 if torch.backends.mps.is_available() else 0
    backend = getattr(torch, device_type, None)
    if backend is None or not callable(getattr(backend, "is_available", None)):
        return None
    if not backend.is_available():
        return 0
    count = getattr(backend, "device_count", None)
    return count() if callable(count) else 1


def available_device(device: torch.device | str | int) -> torch.device:
    """``device`` as a `torch.device`, when this machine has it: ``cpu``, ``meta`` (shapes only) or an
    accelerator that is present, such as ``cuda:0`` on a machine with a CUDA device.

    Raises:
        ValueError: a name torch does not read as a device, or a device this machine does not have, naming
            what was expected and what was found.
    """
    if isinstance(device, bool) or not isinstance(device, (torch.device, str, int)):
        raise ValueError(f"device must be a device name such as cpu or cuda:0, found {type(device).__name__} "
                         f"{device!r:.40}")
    try:
        parsed = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"expected a device such as cpu or cuda:0, found {device!r} ({error})") from None
    if parsed.type in ("cpu", "meta"):
        return parsed
    count = _count(parsed.type)
    if count == 0:
        raise ValueError(f"expected a device this machine has, found {device!r} (no {parsed.type} device here)")
    if count is not None and parsed.index is not None and parsed.index >= count:
        raise ValueError(f"expected a device this machine has, found {device!r} ({count} {parsed.type} "
                         "device(s))")
    return parsed
