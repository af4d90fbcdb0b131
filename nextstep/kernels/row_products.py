"""A few rows times a block of weight rows, summed in registers: the product helper of the head's kernels.

Legend: BM rows, BN weight rows (output features), BK reduction step, K inner width.

For the few rows of a decode step a 16-row matrix-product instruction is
mostly padding, so the head's kernels (`nextstep.kernels.persistent_head`, and
`nextstep.kernels.adaln_linear` with ``Tiles.rows_product``) multiply on the
CUDA cores instead. Done naively (load a (BM, BK) tile of u and a (BN, BK)
tile of weights, broadcast both to (BM, BN, BK), sum over K every step) each
step moves both tiles between threads through shared memory and reduces across
threads, with barriers: the loop cannot keep many loads in flight. Here both
u and the weights are loaded directly in the (BM, BN, BK) shape of the
products: each thread reads the u values and the weights that its products
meet, and the addresses several threads share are served by L1. The products
are summed element by element; the one reduction over K comes after the loop.
The loop is loads and multiply-adds only (checked on compiled code by
`nextstep.kernels.target_compile`, with every Triton release it was tried on:
a (1, BN, BK) weight tile broadcast over the rows is kept in registers by some
and moved between threads through shared memory by others).

The helper is a Triton function for kernels to call (`rows_times_weight_function`).
"""

from __future__ import annotations

import functools

from nextstep.kernels.triton_support import triton_module

#: ``triton.language``, bound when the helper is first built.
tl = None

__all__ = ["rows_times_weight_function"]


@functools.cache
def rows_times_weight_function(interpret: bool):
    """The Triton function ``rows_times_weight(u_ptr, u_stride, weight_ptr, inner, row, row_inside, column,
    column_inside, BM, BN, BK, FRESH) -> (BM, BN) fp32``: rows ``row`` of u (row stride ``u_stride``, K
    contiguous) times weight rows ``column`` (K contiguous, row stride ``inner``), over ``inner`` features.
    ``FRESH``: u was written by other programs of a running kernel (its loads bypass L1).

    Args:
        interpret: built for Triton's interpreter (a cache key, like the kernels' builders).
    """
    global tl  # Triton's interpreter patches the `triton.language` it finds among a function's globals
    triton = triton_module()
    import triton.language as tl

    @triton.jit
    def rows_times_weight(u_ptr, u_stride, weight_ptr, inner, row, row_inside, column, column_inside,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, FRESH: tl.constexpr):
        every_column = column[None, :, None] >= 0  # the (BM, BN, BK) shape, for u's mask
        u_rows = u_ptr + row.to(tl.int64)[:, None, None] * u_stride + 0 * column[None, :, None]
        weight_rows = weight_ptr + column.to(tl.int64)[None, :, None] * inner + 0 * row[:, None, None]
        total = tl.zeros((BM, BN, BK), dtype=tl.float32)
        for start in range(0, inner, BK):
            k = start + tl.arange(0, BK)
            k_inside = (k < inner)[None, None, :]
            u_inside = row_inside[:, None, None] & k_inside & every_column
            if FRESH:
                u = tl.load(u_rows + k[None, None, :], mask=u_inside, other=0.0, cache_modifier=".cg")
            else:
                u = tl.load(u_rows + k[None, None, :], mask=u_inside, other=0.0)
            weight = tl.load(weight_rows + k[None, None, :], mask=column_inside[None, :, None] & k_inside,
                             other=0.0)  # (BM, BN, BK), the same weights in every row
            total += u.to(tl.float32) * weight.to(tl.float32)
        return tl.sum(total, axis=2)

    return rows_times_weight
