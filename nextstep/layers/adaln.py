"""Adaptive-LayerNorm MLP blocks (the per-token "SimpleMLPAdaLN" family)."""

from __future__ import annotations

import torch
from torch import nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 + scale) + shift``; all (N, dim)."""
    return x * (1 + scale) + shift


class AdaLNResBlock(nn.Module):
    """Residual MLP block whose LayerNorm is modulated by a conditioning vector.

    ``h = MLP(modulate(LN(x), shift, scale)); x + gate * h`` with
    ``(shift, scale, gate) = Linear(SiLU(y))``.

    Args:
        dim: token width.
        mlp_ratio: hidden width of the MLP as a multiple of ``dim``.
    """

    def __init__(self, dim: int, mlp_ratio: float = 1.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.in_ln = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y: (N, dim) -> (N, dim)."""
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        h = self.mlp(modulate(self.in_ln(x), shift, scale))
        return x + gate * h


class AdaLNFinalLayer(nn.Module):
    """``Linear(modulate(LN(x), shift, scale))`` with an affine-free LayerNorm.

    Args:
        dim: token width.
        out_dim: output width.
    """

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y: (N, dim) -> (N, out_dim)."""
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))
