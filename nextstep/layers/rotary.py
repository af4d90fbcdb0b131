"""Rotary position embedding over 1-D positions (the "rotate half" layout of Qwen2).

Legend: B batch, L positions, E head dim.

A head vector ``x = [x1, x2]`` (two halves) at position ``p`` becomes
``x * cos(p f) + [-x2, x1] * sin(p f)`` with frequencies ``f = theta^(-2i/E)``
repeated over both halves.

Two forms of the tables exist. `RotaryEmbedding.forward` returns the plain
``(cos, sin)`` consumed by `apply_rotary`. `RotaryEmbedding.signed_tables`
returns ``(cos, signed_sin)`` with the first half of ``sin`` negated, consumed
by `rotate`: then ``[-x2, x1] * sin == roll(x, E/2) * signed_sin``, one kernel
instead of three, which matters when a decode step is a few microseconds.
"""

from __future__ import annotations

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last axis."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys with the plain tables of `RotaryEmbedding.forward`.

    Args:
        x: queries or keys, shape (B, heads, L, E).
        cos: shape (B, L, E).
        sin: shape (B, L, E).

    Returns:
        the rotated input, shape (B, heads, L, E).
    """
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate with the tables of `RotaryEmbedding.signed_tables`; tables broadcast against ``x``.

    Args:
        x: queries or keys, shape (..., E), for example (B, L, heads, E).
        cos: shape broadcastable to ``x``, for example (B, L, 1, E).
        signed_sin: like ``cos``.

    Returns:
        the rotated input, shape of ``x``.
    """
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), signed_sin)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for arbitrary integer positions.

    Args:
        head_dim: per-head size E (even).
        theta: base of the geometric frequency progression.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embedding, found {head_dim}")
        self.head_dim = head_dim
        self.theta = theta
        inv_freq, signed = self._frequencies(torch.device("cpu"))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("signed_frequencies", signed, persistent=False)

    def _frequencies(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float()
        inv_freq = 1.0 / (self.theta ** (exponent / self.head_dim))  # (E/2,)
        # cos is even and sin odd, so negated frequencies give cos unchanged and sin negated.
        return inv_freq, torch.cat((-inv_freq, inv_freq))  # (E/2,), (E,)

    def reset_buffers(self) -> None:
        """Recompute the frequency buffers (after building on the meta device and moving)."""
        self.inv_freq, self.signed_frequencies = self._frequencies(self.inv_freq.device)

    def _apply(self, fn, recurse=True):
        # ``module.to(torch.bfloat16)``, ``.to_empty()`` and the like rewrite buffers;
        # rounded or uninitialised frequencies would shift every angle, so rebuild
        # them in fp32 on the new device.
        super()._apply(fn, recurse)
        self.reset_buffers()
        return self

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Plain tables for `apply_rotary`.

        Args:
            positions: integer positions, shape (B, L).
            dtype: dtype of the returned tables.

        Returns:
            cos and sin, each of shape (B, L, E).
        """
        freqs = positions.float().unsqueeze(-1) * self.inv_freq  # (B, L, E/2)
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def signed_tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for `rotate`, computed in fp32.

        Args:
            positions: integer positions, shape (B, L).
            dtype: dtype of the returned tables.

        Returns:
            cos and signed_sin (first half negated), each of shape (B, L, E).
        """
        angles = positions.unsqueeze(-1).float() * self.signed_frequencies  # (B, L, E)
        cos, signed_sin = angles.cos(), angles.sin()
        if dtype != torch.float32:
            cos, signed_sin = cos.to(dtype), signed_sin.to(dtype)
        return cos, signed_sin
