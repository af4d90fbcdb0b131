"""Rotary position embedding over 1-D positions (the "rotate half" layout of Qwen2)."""

from __future__ import annotations

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys.

    Args:
        x: (B, heads, L, head_dim).
        cos: (B, L, head_dim), from `RotaryEmbedding`.
        sin: (B, L, head_dim), from `RotaryEmbedding`.
    """
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


class RotaryEmbedding(nn.Module):
    """cos/sin tables for arbitrary integer positions.

    Args:
        head_dim: per-head size (even).
        theta: base of the geometric frequency progression.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embedding, found {head_dim}")
        self.head_dim = head_dim
        self.theta = theta
        self.register_buffer("inv_freq", self._inv_freq(torch.device("cpu")), persistent=False)

    def _inv_freq(self, device: torch.device) -> torch.Tensor:
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float()
        return 1.0 / (self.theta ** (exponent / self.head_dim))

    def reset_buffers(self) -> None:
        """Recompute ``inv_freq`` (after building on the meta device and moving)."""
        self.inv_freq = self._inv_freq(self.inv_freq.device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (B, L) integers -> cos, sin: (B, L, head_dim) in ``dtype``."""
        freqs = positions.float().unsqueeze(-1) * self.inv_freq.float()  # (B, L, head_dim/2)
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)
