"""Adaptive-LayerNorm MLP blocks (the per-token "SimpleMLPAdaLN" family).

Legend: N tokens, W block width.

Each block's modulation depends only on the conditioning vector ``y``, never on
``x``. `folded_modulation_parameters` writes it as one linear map of ``SiLU(y)``
(with the LayerNorm affine folded in) so that sampling, which evaluates one
condition at a few known times many times over, can tabulate it once per token
(see `nextstep.heads.prepared_flow_matching`).
"""

from __future__ import annotations

import torch
from torch import nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 + scale) + shift``; all (N, W)."""
    return x * (1 + scale) + shift


class AdaLNResBlock(nn.Module):
    """Residual MLP block whose LayerNorm is modulated by a conditioning vector.

    ``h = MLP(modulate(LN(x), shift, scale)); x + gate * h`` with
    ``(shift, scale, gate) = Linear(SiLU(y))``.

    Args:
        dim: token width W.
        mlp_ratio: hidden width of the MLP as a multiple of ``dim``.
    """

    def __init__(self, dim: int, mlp_ratio: float = 1.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.in_ln = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y: (N, W) -> (N, W)."""
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        h = self.mlp(modulate(self.in_ln(x), shift, scale))
        return x + gate * h

    def folded_modulation_parameters(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The modulation as one linear map of ``SiLU(y)``, with the LayerNorm's affine folded in.

        ``LN(x) * (1 + scale) + shift`` equals ``norm(x) * scale' + shift'`` with
        ``scale' = weight * (1 + scale)`` and ``shift' = shift + bias * (1 + scale)``,
        where ``norm`` has no affine. Both are linear in ``SiLU(y)``, so
        ``[shift', scale', gate] = SiLU(y) @ W.T + b`` and the block becomes
        ``x + gate * MLP(norm(x) * scale' + shift')``.

        Returns:
            W (3W, W) and b (3W,), rows ordered ``[shift', scale', gate]``.
        """
        linear = self.adaLN_modulation[1]
        shift_w, scale_w, gate_w = linear.weight.chunk(3, dim=0)
        shift_b, scale_b, gate_b = linear.bias.chunk(3, dim=0)
        norm_w, norm_b = self.in_ln.weight, self.in_ln.bias
        weight = torch.cat([shift_w + norm_b[:, None] * scale_w, norm_w[:, None] * scale_w, gate_w])
        bias = torch.cat([shift_b + norm_b * (1 + scale_b), norm_w * (1 + scale_b), gate_b])
        return weight, bias


class AdaLNFinalLayer(nn.Module):
    """``Linear(modulate(LN(x), shift, scale))`` with an affine-free LayerNorm.

    Args:
        dim: token width W.
        out_dim: output width.
    """

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y: (N, W) -> (N, out_dim)."""
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))

    def folded_modulation_parameters(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The modulation as one linear map of ``SiLU(y)``: ``[shift, 1 + scale] = SiLU(y) @ W.T + b``.

        The layer is then ``Linear(norm(x) * (1 + scale) + shift)``.

        Returns:
            W (2W, W) and b (2W,).
        """
        linear = self.adaLN_modulation[1]
        shift_b, scale_b = linear.bias.chunk(2, dim=0)
        return linear.weight, torch.cat([shift_b, 1 + scale_b])
