"""``x @ weight.T + bias`` for a few rows: a matrix-vector kernel that streams the weight once.

Legend: M rows (a few), K input features, N output features.

A one-token decode step multiplies a handful of rows (one per image and
guidance branch) by every weight matrix of the decoder: the product reads
N * K weights for 2 * M * N * K operations and is bound by memory bandwidth
alone. Library matrix-product kernels are tiled for many rows; here each
program owns ``block_n`` output features, reads their weight rows along K in
``block_k`` steps (coalesced, the weight's own layout) and keeps the M rows'
running sums in registers, so the weight is read exactly once by many
independent programs. Sums are in fp32 (the order differs from a library
product's, so results agree to rounding).

The weight may also be int8 with one fp32 scale per output feature
(`nextstep.fast.weight_quantization`): half the bytes of bf16, so half the time
of a product bound by reading them. The kernel multiplies the int8 values as
they are and applies the scale to each finished sum.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nextstep.kernels.triton_support import (
    block_size,
    check_num_warps,
    check_power_of_two,
    dispatch,
    interpreter_enabled,
    reduction_step,
    triton_module,
)

#: ``triton.language``, bound when the kernel is first built.
tl = None

__all__ = ["MAX_ROWS", "SkinnyTiles", "set_skinny_tiles", "skinny_linear", "skinny_linear_reference",
           "skinny_linear_triton", "skinny_tiles"]

#: Most rows the kernel takes; larger products belong to a library kernel.
MAX_ROWS = 16


@dataclass(frozen=True)
class SkinnyTiles:
    """How the kernel splits its work.

    Attributes:
        block_n: output features per program (a power of two >= 1).
        block_k: reduction step (a power of two >= 16).
        num_warps: warps per program (1, 2, 4, 8 or 16).
        num_stages: loads kept in flight by the compiler's pipelining (>= 1).
    """

    block_n: int = 8
    block_k: int = 512
    num_warps: int = 4
    num_stages: int = 4

    def __post_init__(self):
        check_power_of_two("block_n", self.block_n)
        check_power_of_two("block_k", self.block_k, 16)
        check_num_warps(self.num_warps)
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"num_stages must be an integer >= 1, found {self.num_stages!r}")


_TILES = SkinnyTiles()


def skinny_tiles() -> SkinnyTiles:
    """The tiles the kernel launches with."""
    return _TILES


def set_skinny_tiles(new: SkinnyTiles) -> SkinnyTiles:
    """Launch the kernel with ``new`` tiles from now on; returns the previous ones (results do not depend
    on them beyond float rounding)."""
    global _TILES
    if not isinstance(new, SkinnyTiles):
        raise TypeError(f"set_skinny_tiles takes a SkinnyTiles, found {type(new).__name__}")
    previous, _TILES = _TILES, new
    return previous


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor | None) -> None:
    if x.ndim != 2:
        raise ValueError(f"x must have shape (M, K), found {tuple(x.shape)}")
    if weight.ndim != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must have shape (N, {x.shape[1]}), found {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), found {tuple(bias.shape)}")
    if (weight.dtype == torch.int8) != (scale is not None):
        raise ValueError(f"an int8 weight needs its scale and only an int8 weight takes one; found a {weight.dtype} "
                         f"weight and {'a' if scale is not None else 'no'} scale")
    if scale is not None and scale.shape != (weight.shape[0],):
        raise ValueError(f"scale must have shape ({weight.shape[0]},), found {tuple(scale.shape)}")
    for name, tensor in (("weight", weight), ("bias", bias), ("scale", scale)):
        if tensor is not None and tensor.device != x.device:
            raise ValueError(f"{name} must be on {x.device} like x, found {tensor.device}")


def skinny_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            scale: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.nn.functional.linear``, of the dequantized weight (``weight * scale[:, None]``) for int8.

    Args:
        x: shape (M, K).
        weight: shape (N, K), floating, or int8 with ``scale``.
        bias: shape (N,), or None.
        scale: shape (N,), the int8 weight's per-feature scale, or None.

    Returns:
        shape (M, N), dtype of ``x``.
    """
    _check(x, weight, bias, scale)
    if scale is None:
        return F.linear(x, weight, bias)
    out = F.linear(x.float(), weight.float()) * scale.float()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


@functools.cache
def _kernel(interpret: bool):
    """Build the Triton kernel (once per interpreter setting)."""
    global tl  # Triton's interpreter patches the `triton.language` it finds among the kernel's globals
    triton = triton_module()
    import triton.language as tl

    @triton.jit
    def skinny_linear_kernel(x_ptr, weight_ptr, bias_ptr, scale_ptr, out_ptr, rows, inner, outer, x_stride,
                             out_stride, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, BM: tl.constexpr,
                             BN: tl.constexpr, BK: tl.constexpr):
        column = tl.program_id(0) * BN + tl.arange(0, BN)
        column_inside = column < outer
        row = tl.arange(0, BM)
        row_inside = row < rows
        total = tl.zeros((BM, BN), dtype=tl.float32)
        for start in range(0, inner, BK):
            k = start + tl.arange(0, BK)
            k_inside = k < inner
            weight = tl.load(weight_ptr + column.to(tl.int64)[:, None] * inner + k[None, :],
                             mask=column_inside[:, None] & k_inside[None, :], other=0.0)  # (BN, BK)
            x = tl.load(x_ptr + row.to(tl.int64)[:, None] * x_stride + k[None, :],
                        mask=row_inside[:, None] & k_inside[None, :], other=0.0)  # (BM, BK)
            total += tl.sum(x.to(tl.float32)[:, None, :] * weight.to(tl.float32)[None, :, :], axis=2)
        if HAS_SCALE:
            total *= tl.load(scale_ptr + column, mask=column_inside, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            total += tl.load(bias_ptr + column, mask=column_inside, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + row.to(tl.int64)[:, None] * out_stride + column[None, :],
                 total.to(out_ptr.dtype.element_ty), mask=row_inside[:, None] & column_inside[None, :])

    return skinny_linear_kernel


def skinny_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         scale: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton kernel of `skinny_linear` (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``).

    Args:
        x: shape (M, K) with M <= `MAX_ROWS`; rows may be strided.
        weight: shape (N, K), contiguous; floating, or int8 with ``scale``.
        bias: shape (N,), or None.
        scale: shape (N,), the int8 weight's per-feature scale, or None.

    Returns:
        shape (M, N), dtype of ``x``.
    """
    _check(x, weight, bias, scale)
    rows, inner = x.shape
    if rows > MAX_ROWS:
        raise ValueError(f"skinny_linear takes at most {MAX_ROWS} rows, found {rows}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    weight = weight.contiguous()
    outer = weight.shape[0]
    out = torch.empty((rows, outer), dtype=x.dtype, device=x.device)
    if rows == 0 or outer == 0:
        return out
    if inner == 0:
        return out.zero_() if bias is None else out.copy_(bias.expand(rows, outer))
    scale = None if scale is None else scale.contiguous()
    tiles = _TILES
    block_m = block_size(rows)
    block_k = reduction_step(tiles.block_k, block_m, tiles.block_n)
    _kernel(interpreter_enabled())[(triton_module().cdiv(outer, tiles.block_n),)](
        x, weight, x if bias is None else bias, x if scale is None else scale, out, rows, inner, outer,
        x.stride(0), out.stride(0), HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, BM=block_m,
        BN=tiles.block_n, BK=block_k, num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return out


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (weight * scale[:, None]).T + bias``: the Triton kernel where allowed and M <= `MAX_ROWS`, else
    the reference.

    Args:
        x: shape (M, K).
        weight: shape (N, K); floating, or int8 with ``scale``.
        bias: shape (N,), or None.
        scale: shape (N,), the int8 weight's per-feature scale, or None.

    Returns:
        shape (M, N), dtype of ``x``.
    """
    if x.ndim == 2 and x.shape[0] > MAX_ROWS:
        return skinny_linear_reference(x, weight, bias, scale)
    return dispatch("skinny_linear", x, skinny_linear_triton, skinny_linear_reference, x, weight, bias, scale)
