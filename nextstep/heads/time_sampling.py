"""Distributions of training times t in [0, 1] (t=0 noise, t=1 data)."""

from __future__ import annotations

import torch

TIME_SAMPLINGS = ("logit_normal", "uniform")


def check_generator(generator: object, name: str = "generator") -> None:
    """Raise ``TypeError`` unless ``generator`` is a ``torch.Generator`` or None (a seed is not one:
    ``torch.Generator().manual_seed(seed)`` makes one)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{name} must be a torch.Generator or None, found {type(generator).__name__} {generator!r:.40} "
                        "(torch.Generator().manual_seed(seed) makes one from a seed)")


def sample_times(
    count: int,
    method: str = "logit_normal",
    *,
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw ``count`` training times.

    ``logit_normal``: ``sigmoid(N(mean, std))`` (NextStep-1 uses mean 0, std 1);
    ``uniform``: ``U(0, 1)``. A ``shift`` other than 1 then moves the times toward
    noise with the sampling grid's formula ``t / (shift - (shift - 1) t)``
    (NextStep-1 trains without a shift).

    Args:
        count: how many times.
        method: one of `TIME_SAMPLINGS`.
        mean: mean of the normal inside the logit-normal.
        std: standard deviation of the normal inside the logit-normal.
        shift: time shift (> 0).
        generator: source of randomness.
        device: where to draw.

    Returns:
        (count,) float32 times in (0, 1).

    Raises:
        TypeError: a ``generator`` that is not a ``torch.Generator``.
        ValueError: an unknown ``method``.
    """
    check_generator(generator)
    if method == "logit_normal":
        normal = torch.randn(count, generator=generator, device=device) * std + mean
        t = torch.sigmoid(normal)
    elif method == "uniform":
        t = torch.rand(count, generator=generator, device=device)
    else:
        raise ValueError(f"unknown time sampling {method!r}; known: {list(TIME_SAMPLINGS)}")
    if shift != 1.0:
        from nextstep.samplers.time_grid import shift_time

        t = shift_time(t, shift)
    return t
