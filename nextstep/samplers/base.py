"""The sampler interface: integrate a velocity field from noise (t=0) to data (t=1).

Legend: N tokens sampled together, D token dim, S intervals of the time grid,
E distinct evaluation times.

A sampler is stateless: everything it needs comes in as arguments, so one
instance serves any batch, any step count and any guidance. It works on all N
tokens at once; times are tensors, so nothing inside the loop waits on the device.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

import torch

from nextstep.samplers.time_grid import time_grid


class VelocityFn(Protocol):
    """``(x_t (N, D), t (N,)) -> velocity (N, D)``, guidance already applied."""

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...


class Sampler(ABC):
    """Integrates ``dx/dt = v(x, t)`` over a time grid.

    Implement `sample`. Override `make_time_grid` when the solver needs a grid
    of its own, and `evaluation_times` to let the image head precompute its
    time-dependent work. The constructor takes the config (an instance of
    ``config_class``, its defaults when None) as ``self.config``.

    Attributes:
        config_class: the sampler's config dataclass (a `nextstep.config.Config`).
        order: the solver's order of convergence on smooth ODEs (1 for Euler).
        evaluations_per_step: velocity calls per interval of the grid.
        stochastic: whether `sample` consumes ``step_noise``; generation then
            draws (S, N, D) standard normal noise per token from each image's generator.
    """

    config_class: type | None = None
    order: int = 1
    evaluations_per_step: int = 1
    stochastic: bool = False

    def __init__(self, config=None):
        expected = self.config_class
        if config is None and expected is not None:
            config = expected()
        elif expected is not None and not isinstance(config, expected):
            raise TypeError(f"{type(self).__name__} takes a {expected.__name__} (or None for its defaults), "
                            f"found {type(config).__name__}")
        self.config = config

    def make_time_grid(
        self,
        num_steps: int,
        shift: float = 1.0,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """The grid this sampler runs on for ``num_steps`` intervals.

        Args:
            num_steps: S.
            shift: time shift (see `nextstep.samplers.time_grid.shift_time`).
            device: where to put the grid.
            dtype: dtype of the grid.

        Returns:
            (S + 1,) increasing times; by default the shifted uniform grid from 0 to 1.
        """
        return time_grid(num_steps, shift, device=device, dtype=dtype)

    def evaluation_times(self, time_grid: torch.Tensor) -> torch.Tensor | None:
        """Every time at which `sample` will call the velocity function on this grid.

        A sampler that returns a tensor here promises that each ``t`` it passes to
        ``velocity_fn`` is bitwise one of these values; the image head may then
        precompute its time-dependent work once per token (see
        `nextstep.heads.base.ImageHead.prepare`). Returning None (the default)
        makes no promise and is always correct.

        Args:
            time_grid: (S + 1,) the grid that will be passed to `sample`.

        Returns:
            (E,) increasing distinct times in the grid's dtype, or None.
        """
        return None

    @abstractmethod
    def sample(
        self,
        velocity_fn: VelocityFn,
        noise: torch.Tensor,
        time_grid: torch.Tensor,
        step_noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Integrate from ``noise`` at ``time_grid[0]`` to ``time_grid[-1]``.

        Args:
            velocity_fn: the (guided) velocity field.
            noise: (N, D) starting points x0.
            time_grid: (S + 1,) increasing times, usually from 0 to 1.
            step_noise: (S, N, D) standard normal noise for stochastic samplers,
                drawn by the caller so that results depend only on its generators.

        Returns:
            (N, D) samples at the last time.
        """


def check_step_noise(sampler: Sampler, step_noise: torch.Tensor | None, noise: torch.Tensor,
                     num_steps: int) -> torch.Tensor:
    """Return ``step_noise`` after checking that it is (at least S, N, D); raise otherwise."""
    name = type(sampler).__name__
    if not isinstance(noise, torch.Tensor) or noise.ndim != 2:
        raise ValueError(f"{name} needs noise of shape (N, D), found "
                         f"{tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__}")
    if step_noise is None:
        raise ValueError(
            f"{name} is stochastic and needs step_noise of shape ({num_steps}, "
            f"{noise.shape[0]}, {noise.shape[1]}), found None"
        )
    if step_noise.ndim != 3 or step_noise.shape[0] < num_steps or step_noise.shape[1:] != noise.shape:
        raise ValueError(
            f"{name} needs step_noise of shape ({num_steps}, {noise.shape[0]}, {noise.shape[1]}), "
            f"found {tuple(step_noise.shape)}"
        )
    return step_noise


def check_time_grid(time_grid: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``time_grid`` is a 1-D tensor of at least two times, increasing (checked
    where it is on the CPU, so that a grid on an accelerator is not waited for): noise at the first time,
    data at the last, as `nextstep.samplers.time_grid.time_grid` makes one. A grid from 1 down to 0 (noise
    levels, as samplers of other libraries run) is refused: ``1 - grid.flip(0)`` is its time grid."""
    expected = "time_grid must be a 1-D tensor of at least 2 increasing times in [0, 1] (t=0 noise, t=1 data)"
    if not isinstance(time_grid, torch.Tensor):
        raise ValueError(f"{expected}, found a {type(time_grid).__name__}")
    if time_grid.ndim != 1 or time_grid.shape[0] < 2:
        raise ValueError(f"{expected}, found shape {tuple(time_grid.shape)}")
    if time_grid.device.type == "cpu" and not (bool((time_grid.diff() > 0).all()) and 0 <= time_grid[0]
                                               and time_grid[-1] <= 1):
        values = [f"{value:.4g}" for value in time_grid.tolist()]
        shown = values if len(values) <= 8 else values[:6] + ["...", values[-1]]
        raise ValueError(f"{expected}, found [{', '.join(shown)}]")


def interval_start_times(time_grid: torch.Tensor, rows: int) -> tuple[torch.Tensor, ...]:
    """Each interval's start time broadcast to a batch: S tensors of shape (rows,)."""
    return time_grid[:-1, None].expand(-1, rows).contiguous().unbind(0)


def euler_integrate(velocity_fn: VelocityFn, noise: torch.Tensor, time_grid: torch.Tensor) -> torch.Tensor:
    """Explicit Euler over the whole grid: ``x <- x + (t_{k+1} - t_k) * v(x, t_k)``.

    Args:
        velocity_fn: the velocity field.
        noise: (N, D) values at ``time_grid[0]``.
        time_grid: (S + 1,) increasing times.

    Returns:
        (N, D) values at ``time_grid[-1]``.
    """
    x = noise
    steps = time_grid.diff().to(noise.dtype).unbind(0)
    for t, dt in zip(interval_start_times(time_grid, noise.shape[0]), steps):
        x = x.addcmul(velocity_fn(x, t), dt)
    return x
