"""Weights stored as int8 with one scale per output feature, for decode steps bound by reading them.

Legend: N output features, K input features.

At batch 1 a decode step reads every weight of the decoder once per token, so
its time is the weights' bytes over the memory bandwidth. Symmetric per-row
int8 (``w ~ values * scale[:, None]``, ``scale = max|w_row| / 127``) halves the
bytes of bf16: the error of each weight is at most half a step of its row,
``scale / 2``. `nextstep.kernels.skinny_linear.skinny_linear` multiplies by
such weights directly. The activations stay in the model's dtype; only the
decode step's matrix products use the int8 copies, so prefill and training are
unaffected.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Int8Weight", "quantize_int8"]


@dataclass(frozen=True)
class Int8Weight:
    """A weight matrix as int8 values and per-row scales.

    Attributes:
        values: (N, K) int8 in [-127, 127].
        scale: (N,) float32; row n is ``values[n] * scale[n]``.
    """

    values: torch.Tensor
    scale: torch.Tensor

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(N, K) ``values * scale[:, None]`` in ``dtype``."""
        return (self.values.float() * self.scale[:, None]).to(dtype)

    @property
    def nbytes(self) -> int:
        """Bytes a product reads: the values and the scales."""
        return self.values.nbytes + self.scale.nbytes


def quantize_int8(weight: torch.Tensor) -> Int8Weight:
    """Round ``weight`` (N, K) to int8 with one scale per row (rows of zeros get scale 1).

    Args:
        weight: a floating (N, K) matrix, K >= 1.

    Returns:
        the `Int8Weight`, on the weight's device.
    """
    if weight.ndim != 2 or not weight.is_floating_point() or weight.shape[1] == 0:
        raise ValueError(
            f"quantize_int8 takes a floating (N, K) matrix with K >= 1, found {tuple(weight.shape)} {weight.dtype}"
        )
    with torch.no_grad():
        values = weight.detach().float()
        largest = values.abs().amax(dim=1)  # NaN or inf in exactly the rows that hold such a value
        rows = (~torch.isfinite(largest)).nonzero()[:, 0].tolist()
        if rows:
            raise ValueError(f"quantize_int8 takes finite weights, found NaN or infinite values in rows {rows[:5]}"
                             f"{' ...' if len(rows) > 5 else ''}")
        scale = largest / 127.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        quantized = torch.round(values / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return Int8Weight(quantized, scale)
