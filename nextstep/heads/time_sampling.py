"""Distributions of training times t in [0, 1]."""

from __future__ import annotations

import torch

TIME_SAMPLINGS = ("logit_normal", "uniform")


def sample_times(
    count: int,
    method: str = "logit_normal",
    *,
    mean: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw ``count`` training times, float32 (count,).

    ``logit_normal``: ``sigmoid(N(mean, std))`` (NextStep-1 uses mean 0, std 1);
    ``uniform``: ``U(0, 1)``.
    """
    if method == "logit_normal":
        normal = torch.randn(count, generator=generator, device=device) * std + mean
        return torch.sigmoid(normal)
    if method == "uniform":
        return torch.rand(count, generator=generator, device=device)
    raise ValueError(f"unknown time sampling {method!r}; known: {list(TIME_SAMPLINGS)}")
