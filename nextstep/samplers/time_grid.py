"""Time grids for sampling, with the resolution shift implemented once.

Legend: S intervals of a grid (``S + 1`` points).

Every grid runs from noise (t=0) toward data (t=1). The shift
``t' = t / (s - (s - 1) t)`` is applied by `shift_time` and nowhere else.
"""

from __future__ import annotations

import math

import torch


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """``t / (shift - (shift - 1) * t)``: spends more steps near noise when ``shift > 1``.

    Under ``sigma = 1 - t`` this is the SD3 / diffusers shift
    ``shift * sigma / (1 + (shift - 1) * sigma)``. It keeps 0 and 1 fixed.

    Args:
        t: times in [0, 1], any shape.
        shift: positive shift factor ``s``; 1 leaves ``t`` unchanged.

    Returns:
        shifted times, same shape and dtype as ``t``.
    """
    if not 0 < shift < math.inf:
        raise ValueError(f"shift must be finite and positive, found {shift!r}")
    return t / (shift - (shift - 1.0) * t)


def check_num_steps(num_steps: int, name: str = "num_steps") -> None:
    """Raise ``ValueError`` unless ``num_steps`` is an integer >= 1."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"{name} must be an integer >= 1, found {num_steps!r}")


def _increasing(grid: torch.Tensor, shift: float, device, dtype: torch.dtype) -> torch.Tensor:
    """``grid`` (float64, on the CPU) in ``dtype`` on ``device``, after checking that no two of its times
    coincide in ``dtype`` (an extreme shift crowds them at one end)."""
    cast = grid.to(dtype)
    if cast.numel() > 1 and not bool((cast.diff() > 0).all()):
        raise ValueError(f"shift {shift!r} crowds the {cast.numel() - 1}-step grid so that some of its times are "
                         f"equal in {dtype} (a step of zero length, or a start at t = 1); use a shift closer to 1")
    return cast.to(device)


def time_grid(
    num_steps: int,
    shift: float = 1.0,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Shifted uniform grid from 0 to 1 with ``num_steps`` intervals.

    This is also the later NextStep-1 release's grid
    (``linspace(0, 1, S + 1)[:-1]`` shifted, then 1 appended), because the shift
    maps 1 to 1.

    Args:
        num_steps: S, the number of intervals.
        shift: time shift (see `shift_time`).
        device: where to put the grid.
        dtype: dtype of the grid.

    Returns:
        (S + 1,) increasing times, first 0, last 1.

    Raises:
        ValueError: a shift so far from 1 that two of the times are equal in ``dtype``.
    """
    check_num_steps(num_steps)
    grid = torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64)
    return _increasing(shift_time(grid, shift), shift, device, dtype)


def truncated_time_grid(
    num_steps: int,
    shift: float = 1.0,
    last_step_size: float = 0.04,
    *,
    to_one: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The first NextStep-1 release's grid: ``shift(linspace(0, 1 - L, S))`` plus a final point.

    The release integrates its SDE over ``S`` points of ``linspace(0, 1 - L, S)``
    after the shift, then takes one deterministic Euler step of size ``L`` from the
    last of them. That final step ends at ``shift(1 - L) + L``, which is below 1
    for ``shift > 1`` (about 0.922 at shift 3.2 with ``L = 0.04``) and past 1 for
    ``shift < 1`` (about 1.020 at shift 0.5). With
    ``to_one=True`` the final point is 1 instead, so the last step closes the gap.

    Args:
        num_steps: S, the number of intervals (and of velocity evaluations); >= 2
            when ``L > 0`` (at least one SDE interval before the final step).
        shift: time shift applied to the ``linspace`` part.
        last_step_size: L in [0, 1); 0 gives the plain `time_grid`.
        to_one: end the final step at t=1 instead of at ``shift(1 - L) + L``.
        device: where to put the grid.
        dtype: dtype of the grid.

    Returns:
        (S + 1,) increasing times starting at 0.
    """
    check_num_steps(num_steps)
    if not 0.0 <= last_step_size < 1.0:
        raise ValueError(f"last_step_size must be in [0, 1), found {last_step_size!r}")
    if last_step_size == 0.0:
        return time_grid(num_steps, shift, device=device, dtype=dtype)
    if num_steps < 2:
        raise ValueError(
            f"num_steps must be >= 2 when last_step_size > 0 (one SDE step and the final "
            f"Euler step), found {num_steps}"
        )
    points = shift_time(torch.linspace(0.0, 1.0 - last_step_size, num_steps, dtype=torch.float64), shift)
    end = torch.ones(1, dtype=torch.float64) if to_one else points[-1:] + last_step_size
    return _increasing(torch.cat([points, end]), shift, device, dtype)
