"""Sinusoidal embedding of flow time followed by a two-layer MLP."""

from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Embed scalar times as ``[cos(t * f_k), sin(t * f_k)]``.

    Args:
        t: (N,) times, used as given (t in [0, 1] for flow matching).
        dim: output size; frequencies ``f_k = max_period ** (-k / (dim // 2))``.

    Returns:
        (N, dim) float32; an odd ``dim`` is zero-padded by one column.
    """
    if t.ndim != 1:
        raise ValueError(f"t must have shape (N,), one time per row, found {tuple(t.shape)}")
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepEmbedder(nn.Module):
    """``t -> Linear(freq_dim, dim) -> SiLU -> Linear(dim, dim)`` on a sinusoidal code.

    Args:
        dim: output width.
        frequency_dim: size of the sinusoidal code (256 in NextStep-1).
        max_period: longest period of the code.
    """

    def __init__(self, dim: int, frequency_dim: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t: (N,) -> (N, dim)."""
        code = sinusoidal_embedding(t, self.frequency_dim, self.max_period)
        return self.mlp(code.to(self.mlp[0].weight.dtype))
