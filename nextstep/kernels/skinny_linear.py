"""``x @ weight.T + bias`` for a few rows: a matrix-vector kernel that streams the weight once.

Legend: M rows (a few), K input features, N output features.

A one-token decode step multiplies a handful of rows (one per image and
guidance branch) by every weight matrix of the decoder: the product reads
N * K weights for 2 * M * N * K operations and is bound by memory bandwidth
alone. Library matrix-product kernels are tiled for many rows; here each
program owns ``block_n`` output features and up to `ROWS_PER_PROGRAM` rows,
and reads its weight rows along K in ``block_k`` steps (coalesced, 16 bytes
per load, the weight's own layout). Each row keeps a running (block_n,
block_k) sum of products in registers, and the sums are reduced across the
program once, after the last step: the loop over K is loads and multiply-adds
only, with no exchange between threads, so many steps' loads can be in flight.
The rows of x are loaded in the weight tile's shape (each thread reads the x
values its weights meet, from L1) so that no step moves data between threads.
Sums are in fp32 (the order differs from a library product's, so results agree
to rounding).

More rows than `ROWS_PER_PROGRAM` take more programs, each reading the weight
again: `skinny_linear` leaves such products of floating weights to the library
kernel, which reads the weight once.

The weight may also be int8 with one fp32 scale per output feature
(`nextstep.fast.weight_quantization`): half the bytes of bf16, so half the time
of a product bound by reading them. The kernel turns the int8 values into
floats with integer and float additions (a conversion instruction would run at
a quarter of their rate), multiplies them as they are and applies the scale to
each finished sum; `skinny_linear` runs int8 products of up to `MAX_ROWS` rows
with the kernel.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nextstep.kernels.l2_prefetch import prefetch_function
from nextstep.kernels.triton_support import (
    block_size,
    check_num_warps,
    check_power_of_two,
    contiguous_rows,
    dependent_launch_options,
    dispatch,
    grid_dependency_functions,
    interpreter_enabled,
    reduction_step,
    triton_module,
)

#: ``triton.language``, the kernel's helper functions and Triton's grid-dependency functions, bound when the
#: kernel is first built.
tl = int8_to_float = row_products = prefetch_l2 = gdc_wait = gdc_launch_dependents = None

__all__ = ["MAX_ROWS", "ROWS_PER_PROGRAM", "SkinnyTiles", "set_skinny_tiles", "skinny_linear",
           "skinny_linear_reference", "skinny_linear_triton", "skinny_tiles"]

#: Most rows the kernel takes; larger products belong to a library kernel.
MAX_ROWS = 16
#: Rows one program multiplies, each with its own running sums in registers.
ROWS_PER_PROGRAM = 4
#: Reduction steps of weights a dependently launched program asks L2 for before it waits for the kernel
#: ahead (`nextstep.kernels.triton_support.dependent_launches`).
PREFETCH_STEPS = 4


@dataclass(frozen=True)
class SkinnyTiles:
    """How the kernel splits its work.

    Attributes:
        block_n: output features per program (a power of two >= 1).
        block_k: reduction step (a power of two >= 16).
        num_warps: warps per program (1, 2, 4, 8 or 16).
        num_stages: steps of K whose loads the compiler's pipelining keeps in
            flight through shared memory (>= 1; 1: plain loads, and the programs
            resident on a multiprocessor hide each other's latency).
    """

    block_n: int = 8
    block_k: int = 512
    num_warps: int = 4
    num_stages: int = 1

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
    # Triton's interpreter patches the `triton.language` it finds among the kernel's globals, and a
    # kernel finds the functions it calls among its globals too.
    global tl, int8_to_float, row_products, prefetch_l2, gdc_wait, gdc_launch_dependents
    triton = triton_module()
    import triton.language as tl

    prefetch_l2 = prefetch_function(interpret)
    gdc_wait, gdc_launch_dependents = grid_dependency_functions()

    @triton.jit
    def int8_to_float(values):
        # int8 -> fp32 exactly, with one integer and one float addition (a conversion instruction runs at a
        # quarter of their rate): 0x4B000000 is the float 2^23, and w + 128 (0 to 255) fills the low bits of
        # its mantissa, so 0x4B000000 + w + 128 is the float 2^23 + w + 128.
        bits = values.to(tl.int32) + (0x4B000000 + 128)
        return bits.to(tl.float32, bitcast=True) - 8388736.0  # 2^23 + 128

    @triton.jit
    def row_products(weight, x_row_ptr, k, broadcast, mask):
        # weight (BN, BK) fp32 times one row of x at features k, loaded in the weight tile's shape.
        return weight * tl.load(x_row_ptr + broadcast + k[None, :], mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def skinny_linear_kernel(x_ptr, weight_ptr, bias_ptr, scale_ptr, out_ptr, rows, inner, outer, x_stride,
                             out_stride, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, ROWS: tl.constexpr,
                             BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr, STAGES: tl.constexpr,
                             PDL: tl.constexpr, LINE: tl.constexpr, PREFETCH_LINES: tl.constexpr):
        column = tl.program_id(0) * BN + tl.arange(0, BN)
        column_inside = column < outer
        if PDL:  # launched dependently: let the next kernel start, ask L2 for the first weights, then wait
            gdc_launch_dependents()
            lines = tl.minimum(tl.arange(0, PREFETCH_LINES) * LINE, inner - 1)
            prefetch_l2(weight_ptr + tl.minimum(column, outer - 1).to(tl.int64)[:, None] * inner + lines[None, :])
            gdc_wait()
        first_row = tl.program_id(1) * ROWS
        weight_rows = weight_ptr + column.to(tl.int64)[:, None] * inner
        # Rows past the last one repeat it (their sums are not stored), so that x loads need no row mask.
        x_row0 = x_ptr + first_row.to(tl.int64) * x_stride
        x_row1 = x_ptr + tl.minimum(first_row + 1, rows - 1).to(tl.int64) * x_stride
        x_row2 = x_ptr + tl.minimum(first_row + 2, rows - 1).to(tl.int64) * x_stride
        x_row3 = x_ptr + tl.minimum(first_row + 3, rows - 1).to(tl.int64) * x_stride
        broadcast = tl.zeros((BN, 1), dtype=tl.int32)  # every weight row meets the same x values
        sum0 = tl.zeros((BN, BK), dtype=tl.float32)
        sum1 = tl.zeros((BN, BK), dtype=tl.float32)
        sum2 = tl.zeros((BN, BK), dtype=tl.float32)
        sum3 = tl.zeros((BN, BK), dtype=tl.float32)
        for start in tl.range(0, inner, BK, num_stages=STAGES):
            k = start + tl.arange(0, BK)
            if EVEN_K:
                k_inside = broadcast == 0
            else:
                k_inside = (broadcast == 0) & (k < inner)[None, :]
            weight = tl.load(weight_rows + k[None, :], mask=column_inside[:, None] & k_inside, other=0)
            if HAS_SCALE:
                weight = int8_to_float(weight)
            else:
                weight = weight.to(tl.float32)
            sum0 += row_products(weight, x_row0, k, broadcast, k_inside)
            if ROWS > 1:
                sum1 += row_products(weight, x_row1, k, broadcast, k_inside)
            if ROWS > 2:
                sum2 += row_products(weight, x_row2, k, broadcast, k_inside)
            if ROWS > 3:
                sum3 += row_products(weight, x_row3, k, broadcast, k_inside)
        if HAS_SCALE:
            scale = tl.load(scale_ptr + column, mask=column_inside, other=0.0).to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + column, mask=column_inside, other=0.0).to(tl.float32)
        out_rows = out_ptr + first_row.to(tl.int64) * out_stride + column
        for r in tl.static_range(ROWS):
            if r == 0:
                total = tl.sum(sum0, axis=1)
            elif r == 1:
                total = tl.sum(sum1, axis=1)
            elif r == 2:
                total = tl.sum(sum2, axis=1)
            else:
                total = tl.sum(sum3, axis=1)
            if HAS_SCALE:
                total *= scale
            if HAS_BIAS:
                total += bias
            row_exists = tl.zeros((BN,), dtype=tl.int32) + first_row + r < rows
            tl.store(out_rows + r * out_stride, total.to(out_ptr.dtype.element_ty), mask=column_inside & row_exists)

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
    x = contiguous_rows(x)
    weight = weight.contiguous()
    outer = weight.shape[0]
    out = torch.empty((rows, outer), dtype=x.dtype, device=x.device)
    if rows == 0 or outer == 0:
        return out
    if inner == 0:
        return out.zero_() if bias is None else out.copy_(bias.expand(rows, outer))
    scale = None if scale is None else scale.contiguous()
    tiles = _TILES
    rows_per_program = min(rows, ROWS_PER_PROGRAM)
    block_k = reduction_step(min(tiles.block_k, block_size(inner)), rows_per_program, tiles.block_n,
                             tiles.num_warps)
    triton = triton_module()
    grid = (triton.cdiv(outer, tiles.block_n), triton.cdiv(rows, rows_per_program))
    launch = dependent_launch_options(x)
    line = max(1, 128 // weight.element_size())  # elements per 128-byte line
    _kernel(interpreter_enabled())[grid](
        x, weight, x if bias is None else bias, x if scale is None else scale, out, rows, inner, outer,
        x.stride(0), out.stride(0), HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, ROWS=rows_per_program,
        BN=tiles.block_n, BK=block_k, EVEN_K=inner % block_k == 0, STAGES=tiles.num_stages,
        num_warps=tiles.num_warps, PDL=bool(launch), LINE=line,
        PREFETCH_LINES=block_size(max(1, min(inner, PREFETCH_STEPS * block_k) // line)), **launch)
    return out


def skinny_kernel_takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel is the better product for ``x`` (M, K) and ``weight``: up to `ROWS_PER_PROGRAM` rows
    of a floating weight, up to `MAX_ROWS` of an int8 one."""
    return not (x.ndim == 2 and x.shape[0] > (MAX_ROWS if weight.dtype == torch.int8 else ROWS_PER_PROGRAM))


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (weight * scale[:, None]).T + bias``: the Triton kernel where allowed, else the reference.

    The kernel takes up to `ROWS_PER_PROGRAM` rows of a floating weight (more
    would read the weight more than once: the library's product reads it once)
    and up to `MAX_ROWS` rows of an int8 one.

    Args:
        x: shape (M, K).
        weight: shape (N, K); floating, or int8 with ``scale``.
        bias: shape (N,), or None.
        scale: shape (N,), the int8 weight's per-feature scale, or None.

    Returns:
        shape (M, N), dtype of ``x``.
    """
    if not skinny_kernel_takes(x, weight):
        return skinny_linear_reference(x, weight, bias, scale)
    return dispatch("skinny_linear", x, skinny_linear_triton, skinny_linear_reference, x, weight, bias, scale)
