"""Root-mean-square normalisation (Qwen2 / Llama style)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
    """``weight * x / sqrt(mean(x**2) + eps)``, computed in fp32 and cast back before the weight.

    Args:
        x: input, shape (..., D).
        weight: per-feature gain, shape (D,).
        eps: added to the mean square; a 0-dim fp32 tensor saves wrapping a
            Python number on every call.

    Returns:
        the normalised input, shape (..., D), in the dtype of ``weight * x``.
    """
    dtype = x.dtype
    if dtype != torch.float32:
        x = x.float()
    if isinstance(eps, torch.Tensor):
        # eps + sum(x^2) / D in one call, without wrapping a Python number.
        mean_square = torch.add(eps, (x * x).sum(-1, keepdim=True), alpha=1.0 / x.shape[-1])
    else:
        mean_square = (x * x).mean(-1, keepdim=True) + eps
    x = x * torch.rsqrt(mean_square)
    if dtype != torch.float32:
        x = x.to(dtype)
    return weight * x


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``, computed in fp32 and cast back (see `rms_norm`).

    Args:
        dim: size of the last axis.
        eps: added to the mean square before the square root.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    @property
    def eps(self) -> float:
        return self._eps

    @eps.setter
    def eps(self, value: float) -> None:
        self._eps = value
        # A CPU 0-dim tensor mixes with tensors on any device; built on the CPU even
        # under a meta-device context so that a model loaded onto real memory can use it.
        self._eps_tensor = torch.tensor(value, dtype=torch.float32, device="cpu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., dim) -> (..., dim)."""
        if x.device.type == "cpu":
            return rms_norm(x, self.weight, self._eps_tensor)
        if x.dtype == self.weight.dtype:
            # PyTorch's single-call form: one kernel instead of six on accelerators,
            # where kernel launches dominate a decode step. It applies the gain before
            # rounding to a half-precision dtype, so it may differ from `rms_norm` by
            # one unit in the last place there (identical in fp32).
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
