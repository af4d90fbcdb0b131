"""LayerNorm statistics and the modulated input of a few rows, for kernels that normalise before a product.

The helpers are Triton functions for kernels to call:

- `layer_norm_statistics_function`: the mean and 1/std of each row in fp32, in
  two passes (mean, then the centred variance). Each pass sums per (row,
  feature) in registers and reduces once, after its loop, so the loops
  exchange nothing between threads.
- `modulation_functions`: ``LayerNorm(x) * scale + shift`` of a tile of rows
  (for a product that consumes it tile by tile), and of whole rows into a
  scratch buffer of the program's own (for a product that reads its rows many
  times, `nextstep.kernels.row_products`).

Used by `nextstep.kernels.adaln_linear` and `nextstep.kernels.persistent_head`.
"""

from __future__ import annotations

import functools

from nextstep.kernels.triton_support import triton_module

#: ``triton.language`` and the helpers the others call, bound when the helpers are first built.
tl = layer_norm_statistics = modulated_tile = None

__all__ = ["layer_norm_statistics_function", "modulation_functions"]


@functools.cache
def layer_norm_statistics_function(interpret: bool):
    """The Triton function ``layer_norm_statistics(x_ptr, row, x_stride, row_inside, width, eps, BM, BK,
    FRESH) -> (mean, rstd)``, each (BM,) fp32: rows ``row`` of x (row stride ``x_stride``, features
    contiguous) over ``width`` features. ``FRESH``: x was written by other programs of a running kernel
    (its loads bypass L1).

    Args:
        interpret: built for Triton's interpreter (a cache key, like the kernels' builders).
    """
    global tl  # Triton's interpreter patches the `triton.language` it finds among a function's globals
    triton = triton_module()
    import triton.language as tl

    @triton.jit
    def layer_norm_statistics(x_ptr, row, x_stride, row_inside, width, eps, BM: tl.constexpr, BK: tl.constexpr,
                              FRESH: tl.constexpr):
        rows = x_ptr + row.to(tl.int64)[:, None] * x_stride
        total = tl.zeros((BM, BK), dtype=tl.float32)
        for start in range(0, width, BK):
            k = start + tl.arange(0, BK)
            inside = row_inside[:, None] & (k < width)[None, :]
            if FRESH:
                x = tl.load(rows + k[None, :], mask=inside, other=0.0, cache_modifier=".cg")
            else:
                x = tl.load(rows + k[None, :], mask=inside, other=0.0)
            total += x.to(tl.float32)
        mean = tl.sum(total, axis=1) / width
        squares = tl.zeros((BM, BK), dtype=tl.float32)
        for start in range(0, width, BK):
            k = start + tl.arange(0, BK)
            inside = row_inside[:, None] & (k < width)[None, :]
            if FRESH:
                x = tl.load(rows + k[None, :], mask=inside, other=0.0, cache_modifier=".cg")
            else:
                x = tl.load(rows + k[None, :], mask=inside, other=0.0)
            centred = tl.where(inside, x.to(tl.float32) - mean[:, None], 0.0)
            squares += centred * centred
        return mean, tl.rsqrt(tl.sum(squares, axis=1) / width + eps)

    return layer_norm_statistics


@functools.cache
def modulation_functions(interpret: bool):
    """The Triton functions ``(modulated_tile, modulate_rows)``.

    ``modulated_tile(x_ptr, x_stride, shift_ptr, shift_stride, scale_ptr, scale_stride, row, k, inside, mean,
    rstd, FRESH) -> (BM, BK) fp32``: ``(x - mean) * rstd * scale + shift`` of rows ``row`` at features ``k``
    (each of x, shift and scale with its own row stride, features contiguous).

    ``modulate_rows(x_ptr, x_stride, shift_ptr, shift_stride, scale_ptr, scale_stride, row, row_inside, width,
    eps, a_ptr, BM, BK, FRESH)``: ``LayerNorm(x) * scale + shift`` of rows ``row`` over ``width`` features,
    rounded to a's dtype, into rows 0 .. BM - 1 of ``a_ptr`` (row stride ``width``); every thread of the
    program sees all of it after the closing barrier.

    ``FRESH``: x was written by other programs of a running kernel (its loads bypass L1).

    Args:
        interpret: built for Triton's interpreter (a cache key, like the kernels' builders).
    """
    # A function finds the functions it calls among its globals.
    global layer_norm_statistics, modulated_tile
    triton = triton_module()
    layer_norm_statistics = layer_norm_statistics_function(interpret)  # also binds `tl`

    @triton.jit
    def modulated_tile(x_ptr, x_stride, shift_ptr, shift_stride, scale_ptr, scale_stride, row, k, inside, mean,
                       rstd, FRESH: tl.constexpr):
        offset = row.to(tl.int64)[:, None]
        if FRESH:
            x = tl.load(x_ptr + offset * x_stride + k[None, :], mask=inside, other=0.0, cache_modifier=".cg")
        else:
            x = tl.load(x_ptr + offset * x_stride + k[None, :], mask=inside, other=0.0)
        shift = tl.load(shift_ptr + offset * shift_stride + k[None, :], mask=inside, other=0.0)
        scale = tl.load(scale_ptr + offset * scale_stride + k[None, :], mask=inside, other=0.0)
        return (x.to(tl.float32) - mean[:, None]) * rstd[:, None] * scale.to(tl.float32) + shift.to(tl.float32)

    @triton.jit
    def modulate_rows(x_ptr, x_stride, shift_ptr, shift_stride, scale_ptr, scale_stride, row, row_inside, width,
                      eps, a_ptr, BM: tl.constexpr, BK: tl.constexpr, FRESH: tl.constexpr):
        mean, rstd = layer_norm_statistics(x_ptr, row, x_stride, row_inside, width, eps, BM, BK, FRESH)
        local_row = tl.arange(0, BM)
        for start in range(0, width, BK):
            k = start + tl.arange(0, BK)
            inside = row_inside[:, None] & (k < width)[None, :]
            a = modulated_tile(x_ptr, x_stride, shift_ptr, shift_stride, scale_ptr, scale_stride, row, k, inside,
                               mean, rstd, FRESH)
            tl.store(a_ptr + local_row[:, None] * width + k[None, :], a.to(a_ptr.dtype.element_ty), mask=inside)
        tl.debug_barrier()

    return modulated_tile, modulate_rows
