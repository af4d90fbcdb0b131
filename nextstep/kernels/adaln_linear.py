"""The flow head's AdaLN MLP block as two fused matrix-product kernels with their prologue and epilogue.

Legend: M rows, K input width, N output width.

An AdaLN residual block of the head (in its folded form, see
`nextstep.layers.adaln.AdaLNResBlock.folded_modulation_parameters`) is::

    u = silu(Linear_1(norm(h) * scale + shift))        # modulated_linear, activation on
    h = h + gate * Linear_2(u)                          # gated_linear

and its output layer is ``Linear(norm(h) * scale + shift)`` (modulated_linear,
activation off). Unfused that is five kernels per block (LayerNorm +
modulation, matrix product, SiLU, matrix product, gated residual); fused it is
two, each reading its weight matrix once. With a few rows (a token's CFG
branches) the products are bound by reading the weights, so the saving is in
launches and in the small intermediate round trips. Products accumulate in fp32;
the modulated input is rounded to the weights' dtype before the product, like
the unfused path.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nextstep.kernels.adaln_modulation import layer_norm_modulate_reference
from nextstep.kernels.row_products import rows_times_weight_function
from nextstep.kernels.row_statistics import layer_norm_statistics_function, modulation_functions
from nextstep.kernels.triton_support import (
    block_size,
    check_num_warps,
    check_power_of_two,
    contiguous_rows,
    dispatch,
    interpreter_enabled,
    reduction_step,
    triton_module,
)

#: ``triton.language`` and the kernels' helper functions, bound when the kernels are first built.
tl = rows_times_weight = layer_norm_statistics = modulated_tile = modulate_rows = dot_step = None

__all__ = ["Tiles", "gated_linear", "gated_linear_reference", "gated_linear_triton", "modulated_linear",
           "modulated_linear_reference", "modulated_linear_triton", "set_tiles", "tiles"]

#: Rows per program: the smallest tile a Triton matrix product takes on a GPU (and the most rows
#: one program of the row-by-row product takes).
BLOCK_M = 16


@dataclass(frozen=True)
class Tiles:
    """How the two kernels split their work.

    Attributes:
        block_n: output columns per program (a power of two, >= 16 unless ``rows_product``).
        block_k: reduction step (a power of two >= 16).
        num_warps: warps per program (1, 2, 4, 8 or 16).
        rows_product: sum the products row by row in registers, with a tile of
            as many rows as the input has (up to 16), instead of a 16-row matrix
            product instruction: for the few rows of a decode step, where most
            of a 16-row tile would be padding (`nextstep.kernels.row_products`;
            the modulated kernel first writes each program's modulated rows to
            a scratch buffer of its own).
    """

    block_n: int = 16
    block_k: int = 128
    num_warps: int = 4
    rows_product: bool = False

    def __post_init__(self):
        check_power_of_two("block_n", self.block_n, 1 if self.rows_product else 16)
        check_power_of_two("block_k", self.block_k, 16)
        check_num_warps(self.num_warps)


_TILES = Tiles()


def tiles() -> Tiles:
    """The tiles the kernels launch with."""
    return _TILES


def set_tiles(new: Tiles) -> Tiles:
    """Launch the kernels with ``new`` tiles from now on (the fastest depend on the GPU and the shapes;
    ``benchmarks/gpu_latency.py`` measures some); returns the previous ones. Results do not depend on them
    beyond float rounding."""
    global _TILES
    if not isinstance(new, Tiles):
        raise TypeError(f"set_tiles takes a Tiles, found {type(new).__name__}")
    previous, _TILES = _TILES, new
    return previous


def _check_matrix(name: str, weight: torch.Tensor, bias: torch.Tensor | None, width: int) -> None:
    if weight.ndim != 2 or weight.shape[1] != width:
        raise ValueError(f"{name} must have shape (N, {width}), found {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"{name} bias must have shape ({weight.shape[0]},), found {tuple(bias.shape)}")


def _check_modulated(x, shift, scale, weight, bias) -> None:
    if x.ndim != 2:
        raise ValueError(f"x must have shape (M, K), found {tuple(x.shape)}")
    for name, tensor in (("shift", shift), ("scale", scale)):
        if tensor.shape != x.shape:
            raise ValueError(f"{name} must have the shape of x {tuple(x.shape)}, found {tuple(tensor.shape)}")
    _check_matrix("weight", weight, bias, x.shape[1])


def _check_gated(u, weight, bias, gate, residual) -> None:
    if u.ndim != 2:
        raise ValueError(f"u must have shape (M, K), found {tuple(u.shape)}")
    _check_matrix("weight", weight, bias, u.shape[1])
    expected = (u.shape[0], weight.shape[0])
    for name, tensor in (("gate", gate), ("residual", residual)):
        if tensor.shape != expected:
            raise ValueError(f"{name} must have shape {expected}, found {tuple(tensor.shape)}")


def modulated_linear_reference(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    eps: float = 1e-6, activation: bool = False,
) -> torch.Tensor:
    """Eager ``Linear(LayerNorm(x) * scale + shift)``, then SiLU if ``activation``.

    Args:
        x: shape (M, K).
        shift: shape (M, K).
        scale: shape (M, K).
        weight: shape (N, K).
        bias: shape (N,), or None.
        eps: LayerNorm epsilon (the LayerNorm has no affine).
        activation: apply SiLU to the output.

    Returns:
        shape (M, N), dtype of ``x``.
    """
    _check_modulated(x, shift, scale, weight, bias)
    out = F.linear(layer_norm_modulate_reference(x, shift, scale, eps).to(weight.dtype), weight, bias)
    return (F.silu(out) if activation else out).to(x.dtype)


def gated_linear_reference(
    u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gate: torch.Tensor, residual: torch.Tensor
) -> torch.Tensor:
    """Eager ``residual + gate * Linear(u)``.

    Args:
        u: shape (M, K).
        weight: shape (N, K).
        bias: shape (N,), or None.
        gate: shape (M, N).
        residual: shape (M, N).

    Returns:
        shape (M, N), dtype of ``residual``.
    """
    _check_gated(u, weight, bias, gate, residual)
    return torch.addcmul(residual, gate, F.linear(u, weight, bias)).to(residual.dtype)


@functools.cache
def _kernels(interpret: bool):
    """Build the two Triton kernels (once per interpreter setting)."""
    # Triton's interpreter patches the `triton.language` it finds among the kernel's globals, and a
    # kernel finds the functions it calls among its globals too.
    global tl, rows_times_weight, layer_norm_statistics, modulated_tile, modulate_rows, dot_step
    triton = triton_module()
    import triton.language as tl

    rows_times_weight = rows_times_weight_function(interpret)
    layer_norm_statistics = layer_norm_statistics_function(interpret)
    modulated_tile, modulate_rows = modulation_functions(interpret)

    @triton.jit
    def dot_step(accumulator, a, weight, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        # accumulator + a @ weight, a already in the weights' dtype, at the precision the launch asks for.
        if UPCAST:
            product = tl.dot(a.to(tl.float32), weight.to(tl.float32), input_precision="ieee")
        elif IEEE:
            product = tl.dot(a, weight, input_precision="ieee")
        else:
            product = tl.dot(a, weight)
        return accumulator + product

    @triton.jit
    def modulated_linear_kernel(x_ptr, shift_ptr, scale_ptr, weight_ptr, bias_ptr, a_ptr, out_ptr, rows, inner,
                                outer, x_stride, shift_stride, scale_stride, out_stride, eps, HAS_BIAS: tl.constexpr,
                                ACTIVATION: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                                ROWS_PRODUCT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                                BK: tl.constexpr):
        row = tl.program_id(0) * BM + tl.arange(0, BM)
        column = tl.program_id(1) * BN + tl.arange(0, BN)
        row_inside = row < rows
        column_inside = column < outer
        row_offset = row.to(tl.int64)
        if ROWS_PRODUCT:
            # The modulated rows, rounded to the weights' dtype, into this program's own rows of a_ptr, then
            # the row-by-row product.
            program = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
            a_rows = a_ptr + program.to(tl.int64) * BM * inner
            modulate_rows(x_ptr, x_stride, shift_ptr, shift_stride, scale_ptr, scale_stride, row, row_inside, inner,
                          eps, a_rows, BM, BK, False)
            accumulator = rows_times_weight(a_rows, inner, weight_ptr, inner, tl.arange(0, BM), row_inside, column,
                                            column_inside, BM, BN, BK, False)
        else:
            mean, rstd = layer_norm_statistics(x_ptr, row, x_stride, row_inside, inner, eps, BM, BK, False)
            accumulator = tl.zeros((BM, BN), dtype=tl.float32)
            for start in range(0, inner, BK):
                k = start + tl.arange(0, BK)
                k_inside = k < inner
                inside = row_inside[:, None] & k_inside[None, :]
                modulated = modulated_tile(x_ptr, x_stride, shift_ptr, shift_stride, scale_ptr, scale_stride, row, k,
                                           inside, mean, rstd, False)
                modulated = tl.where(inside, modulated, 0.0)
                weight = tl.load(weight_ptr + column.to(tl.int64)[None, :] * inner + k[:, None],
                                 mask=column_inside[None, :] & k_inside[:, None], other=0.0)  # (BK, BN)
                # Rounded to the weights' dtype before the product, as the unfused path does.
                accumulator = dot_step(accumulator, modulated.to(weight.dtype), weight, IEEE, UPCAST)
        if HAS_BIAS:
            accumulator += tl.load(bias_ptr + column, mask=column_inside, other=0.0).to(tl.float32)[None, :]
        if ACTIVATION:
            accumulator = accumulator * tl.sigmoid(accumulator)
        tl.store(out_ptr + row_offset[:, None] * out_stride + column[None, :],
                 accumulator.to(out_ptr.dtype.element_ty), mask=row_inside[:, None] & column_inside[None, :])

    @triton.jit
    def gated_linear_kernel(u_ptr, weight_ptr, bias_ptr, gate_ptr, residual_ptr, out_ptr, rows, inner, outer,
                            u_stride, gate_stride, residual_stride, out_stride, HAS_BIAS: tl.constexpr,
                            IEEE: tl.constexpr, UPCAST: tl.constexpr, ROWS_PRODUCT: tl.constexpr,
                            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        row = tl.program_id(0) * BM + tl.arange(0, BM)
        column = tl.program_id(1) * BN + tl.arange(0, BN)
        row_inside = row < rows
        column_inside = column < outer
        row_offset = row.to(tl.int64)
        if ROWS_PRODUCT:  # u has the weights' dtype (the launch sees to it)
            accumulator = rows_times_weight(u_ptr, u_stride, weight_ptr, inner, row, row_inside, column,
                                            column_inside, BM, BN, BK, False)
        else:
            accumulator = tl.zeros((BM, BN), dtype=tl.float32)
            for start in range(0, inner, BK):
                k = start + tl.arange(0, BK)
                k_inside = k < inner
                u = tl.load(u_ptr + row_offset[:, None] * u_stride + k[None, :],
                            mask=row_inside[:, None] & k_inside[None, :], other=0.0)
                weight = tl.load(weight_ptr + column.to(tl.int64)[None, :] * inner + k[:, None],
                                 mask=column_inside[None, :] & k_inside[:, None], other=0.0)  # (BK, BN)
                accumulator = dot_step(accumulator, u.to(weight.dtype), weight, IEEE, UPCAST)
        if HAS_BIAS:
            accumulator += tl.load(bias_ptr + column, mask=column_inside, other=0.0).to(tl.float32)[None, :]
        inside = row_inside[:, None] & column_inside[None, :]
        gate = tl.load(gate_ptr + row_offset[:, None] * gate_stride + column[None, :], mask=inside, other=0.0)
        residual = tl.load(residual_ptr + row_offset[:, None] * residual_stride + column[None, :], mask=inside,
                           other=0.0)
        result = residual.to(tl.float32) + gate.to(tl.float32) * accumulator
        tl.store(out_ptr + row_offset[:, None] * out_stride + column[None, :], result.to(out_ptr.dtype.element_ty),
                 mask=inside)

    return modulated_linear_kernel, gated_linear_kernel


def _upcast() -> bool:
    """Products of half-precision tiles in fp32: needed by Triton's interpreter, which cannot multiply
    bf16 tiles; exact either way (bf16 products fit fp32), slower on a GPU, so used only there."""
    return interpreter_enabled()


def _launch_shape(rows: int, outer: int) -> tuple[tuple[int, int], dict]:
    """The grid and the tile arguments of a launch over (rows, outer) outputs with the current tiles."""
    tiles = _TILES
    block_m, block_k = BLOCK_M, tiles.block_k
    if tiles.rows_product:
        block_m = min(BLOCK_M, block_size(rows))
        # The running sums stay in registers through the loop: 64 per thread at most.
        block_k = reduction_step(block_k, block_m, tiles.block_n, tiles.num_warps)
    grid = ((rows + block_m - 1) // block_m, (outer + tiles.block_n - 1) // tiles.block_n)
    return grid, dict(ROWS_PRODUCT=tiles.rows_product, BM=block_m, BN=tiles.block_n, BK=block_k,
                      num_warps=tiles.num_warps)


def modulated_linear_triton(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    eps: float = 1e-6, activation: bool = False,
) -> torch.Tensor:
    """The Triton kernel of `modulated_linear` (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``).

    Args:
        x: shape (M, K); rows may be strided.
        shift: shape (M, K), for example a strided view into a modulation table.
        scale: shape (M, K).
        weight: shape (N, K), contiguous.
        bias: shape (N,), or None.
        eps: LayerNorm epsilon.
        activation: apply SiLU to the output.

    Returns:
        shape (M, N), dtype of ``x``.
    """
    _check_modulated(x, shift, scale, weight, bias)
    x, shift, scale = contiguous_rows(x), contiguous_rows(shift), contiguous_rows(scale)
    weight = weight.contiguous()
    rows, inner = x.shape
    outer = weight.shape[0]
    out = torch.empty((rows, outer), dtype=x.dtype, device=x.device)
    if rows == 0 or outer == 0:
        return out
    kernel, _ = _kernels(interpreter_enabled())
    grid, launch = _launch_shape(rows, outer)
    # rows_product: each program's modulated rows, (programs, BM, K) in the weights' dtype.
    modulated = (torch.empty(grid[0] * grid[1], launch["BM"], inner, dtype=weight.dtype, device=x.device)
                 if launch["ROWS_PRODUCT"] else weight)
    kernel[grid](
        x, shift, scale, weight, weight if bias is None else bias, modulated, out, rows, inner, outer, x.stride(0),
        shift.stride(0), scale.stride(0), out.stride(0), float(eps), HAS_BIAS=bias is not None,
        ACTIVATION=bool(activation), IEEE=weight.dtype == torch.float32, UPCAST=_upcast(), **launch,
    )
    return out


def gated_linear_triton(
    u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gate: torch.Tensor, residual: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Triton kernel of `gated_linear` (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``).

    Args:
        u: shape (M, K).
        weight: shape (N, K), contiguous.
        bias: shape (N,), or None.
        gate: shape (M, N); rows may be strided.
        residual: shape (M, N).
        out: where to write (may be ``residual``), or None for a new tensor.

    Returns:
        shape (M, N), dtype of ``residual``.
    """
    _check_gated(u, weight, bias, gate, residual)
    u, gate, residual = contiguous_rows(u), contiguous_rows(gate), contiguous_rows(residual)
    weight = weight.contiguous()
    rows, inner = u.shape
    outer = weight.shape[0]
    if out is None:
        out = torch.empty((rows, outer), dtype=residual.dtype, device=residual.device)
    elif out.shape != (rows, outer) or out.stride(-1) != 1:
        raise ValueError(f"out must have shape {(rows, outer)} with contiguous rows, found {tuple(out.shape)}")
    if rows == 0 or outer == 0:
        return out
    _, kernel = _kernels(interpreter_enabled())
    grid, launch = _launch_shape(rows, outer)
    if launch["ROWS_PRODUCT"] and u.dtype != weight.dtype:
        u = u.to(weight.dtype)  # rounded before the product, as the unfused path does
    kernel[grid](
        u, weight, weight if bias is None else bias, gate, residual, out, rows, inner, outer, u.stride(0),
        gate.stride(0), residual.stride(0), out.stride(0), HAS_BIAS=bias is not None,
        IEEE=weight.dtype == torch.float32, UPCAST=_upcast(), **launch,
    )
    return out


def modulated_linear(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    eps: float = 1e-6, activation: bool = False,
) -> torch.Tensor:
    """``Linear(LayerNorm(x) * scale + shift)`` (+ SiLU): the Triton kernel where allowed, else the reference.

    Args:
        x: shape (M, K).
        shift: shape (M, K).
        scale: shape (M, K).
        weight: shape (N, K).
        bias: shape (N,), or None.
        eps: LayerNorm epsilon (no affine).
        activation: apply SiLU to the output.

    Returns:
        shape (M, N), dtype of ``x``.
    """
    return dispatch("modulated_linear", x, modulated_linear_triton, modulated_linear_reference, x, shift, scale,
                    weight, bias, eps, activation)


def gated_linear(
    u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gate: torch.Tensor, residual: torch.Tensor
) -> torch.Tensor:
    """``residual + gate * Linear(u)``: the Triton kernel where allowed, else the reference.

    Args:
        u: shape (M, K).
        weight: shape (N, K).
        bias: shape (N,), or None.
        gate: shape (M, N).
        residual: shape (M, N).

    Returns:
        shape (M, N), dtype of ``residual``.
    """
    return dispatch("gated_linear", u, gated_linear_triton, gated_linear_reference, u, weight, bias, gate, residual)
