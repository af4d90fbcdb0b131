"""Time grids for sampling, with the resolution shift implemented once."""

from __future__ import annotations

import torch


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """``t / (shift - (shift - 1) * t)``: spends more steps near noise when ``shift > 1``.

    Under ``sigma = 1 - t`` this is the SD3 shift ``shift * sigma / (1 + (shift - 1) * sigma)``.
    """
    if shift <= 0:
        raise ValueError(f"shift must be positive, found {shift}")
    return t / (shift - (shift - 1.0) * t)


def time_grid(
    num_steps: int,
    shift: float = 1.0,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Shifted uniform grid from 0 to 1 with ``num_steps`` intervals, shape (num_steps + 1,)."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, found {num_steps!r}")
    grid = torch.linspace(0.0, 1.0, num_steps + 1, device=device, dtype=torch.float64)
    return shift_time(grid, shift).to(dtype)
