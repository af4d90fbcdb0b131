"""LayerNorm statistics of a few rows, for kernels that normalise before a product.

The helper is a Triton function for kernels to call (`layer_norm_statistics_function`):
the mean and 1/std of each row in fp32, in two passes (mean, then the centred
variance). Each pass sums per (row, feature) in registers and reduces once,
after its loop, so the loops exchange nothing between threads. Used by
`nextstep.kernels.adaln_linear` and `nextstep.kernels.persistent_head`.
"""

from __future__ import annotations

import functools

from nextstep.kernels.triton_support import triton_module

#: ``triton.language``, bound when the helper is first built.
tl = None

__all__ = ["layer_norm_statistics_function"]


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
