"""Fused residual add + RMSNorm: ``total = x + delta`` and ``normed = weight * total / rms(total)`` in one pass.

Legend: M rows, H width.

Between two sublayers of a pre-norm decoder (`nextstep.backbones.qwen2`) the
residual stream takes the sublayer's output and the next sublayer reads its
normalised form. Unfused that is an add kernel and a norm kernel (or six, where
the norm is composed of elementwise operations), each reading the (M, H) rows
again; a one-token decode step runs it twice per layer.

Rounding follows the unfused path on a GPU: ``total`` is rounded to the dtype
of ``x`` (a plain add), the norm is computed in fp32 from that rounded total,
and the gain is applied before the result is rounded
(``torch.nn.functional.rms_norm``).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from nextstep.kernels.triton_support import (
    block_size,
    contiguous_rows,
    dependent_launch_options,
    dispatch,
    grid_dependency_functions,
    interpreter_enabled,
    triton_module,
)

#: ``triton.language`` and Triton's grid-dependency functions, bound when the kernel is first built.
tl = gdc_wait = gdc_launch_dependents = None

__all__ = ["add_rms_norm", "add_rms_norm_reference", "add_rms_norm_triton"]


def _check(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor) -> None:
    if x.ndim != 2:
        raise ValueError(f"x must have shape (M, H), found {tuple(x.shape)}")
    if delta is not None and delta.shape != x.shape:
        raise ValueError(f"delta must have the shape of x {tuple(x.shape)}, found {tuple(delta.shape)}")
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"weight must have shape ({x.shape[-1]},), found {tuple(weight.shape)}")
    for name, tensor in (("delta", delta), ("weight", weight)):
        if tensor is not None and tensor.device != x.device:
            raise ValueError(f"{name} must be on {x.device} like x, found {tensor.device}")


def add_rms_norm_reference(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager add, then RMSNorm in fp32 with the gain applied before rounding.

    Args:
        x: the residual stream, shape (M, H).
        delta: what is added to it, shape (M, H), or None (norm of ``x`` alone).
        weight: the norm's gain, shape (H,).
        eps: added to the mean square.

    Returns:
        ``total`` (M, H) in the dtype of ``x`` (``x`` itself when ``delta`` is None),
        and ``normed`` (M, H) in the dtype of ``x``.
    """
    _check(x, delta, weight)
    total = x if delta is None else x + delta
    normed = F.rms_norm(total.float(), total.shape[-1:], weight.float(), eps)
    return total, normed.to(x.dtype)


@functools.cache
def _kernel(interpret: bool):
    """Build the Triton kernel (once per interpreter setting)."""
    # Triton's interpreter patches the `triton.language` it finds among the kernel's globals, and a
    # kernel finds the functions it calls among its globals too.
    global tl, gdc_wait, gdc_launch_dependents
    triton = triton_module()
    import triton.language as tl

    gdc_wait, gdc_launch_dependents = grid_dependency_functions()

    @triton.jit
    def add_rms_norm_kernel(x_ptr, delta_ptr, weight_ptr, total_ptr, normed_ptr, x_stride, delta_stride,
                            total_stride, normed_stride, width, eps, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr,
                            PDL: tl.constexpr):
        if PDL:  # launched dependently: let the next kernel start, then wait for the one ahead
            gdc_launch_dependents()
            gdc_wait()
        row = tl.program_id(0).to(tl.int64)
        columns = tl.arange(0, BLOCK)
        inside = columns < width
        x = tl.load(x_ptr + row * x_stride + columns, mask=inside, other=0.0)
        if HAS_DELTA:
            delta = tl.load(delta_ptr + row * delta_stride + columns, mask=inside, other=0.0)
            total = (x.to(tl.float32) + delta.to(tl.float32)).to(total_ptr.dtype.element_ty)
            tl.store(total_ptr + row * total_stride + columns, total, mask=inside)
            values = total.to(tl.float32)
        else:
            values = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(values * values, axis=0) / width + eps)
        weight = tl.load(weight_ptr + columns, mask=inside, other=0.0).to(tl.float32)
        tl.store(normed_ptr + row * normed_stride + columns, (values * rstd * weight).to(normed_ptr.dtype.element_ty),
                 mask=inside)

    return add_rms_norm_kernel


def add_rms_norm_triton(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernel of `add_rms_norm` (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``).

    The arguments are those of `add_rms_norm_reference`; rows may be strided.

    Returns:
        ``total`` and ``normed``, each (M, H) in the dtype of ``x``.
    """
    _check(x, delta, weight)
    x, delta = contiguous_rows(x), contiguous_rows(delta)
    weight = weight.contiguous()
    rows, width = x.shape
    total = x if delta is None else torch.empty_like(x, memory_format=torch.contiguous_format)
    normed = torch.empty((rows, width), dtype=x.dtype, device=x.device)
    if rows == 0 or width == 0:
        return total, normed
    block = block_size(width)
    warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
    launch = dependent_launch_options(x)
    _kernel(interpreter_enabled())[(rows,)](
        x, x if delta is None else delta, weight, total, normed, x.stride(0),
        0 if delta is None else delta.stride(0), total.stride(0), normed.stride(0), width, float(eps),
        HAS_DELTA=delta is not None, BLOCK=block, num_warps=warps, PDL=bool(launch), **launch)
    return total, normed


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``x + delta`` and its RMSNorm: the Triton kernel where allowed, the reference otherwise.

    Args:
        x: the residual stream, shape (M, H).
        delta: what is added to it, shape (M, H), or None.
        weight: the norm's gain, shape (H,).
        eps: added to the mean square.

    Returns:
        ``total`` and ``normed``, each (M, H) in the dtype of ``x``.
    """
    return dispatch("add_rms_norm", x, add_rms_norm_triton, add_rms_norm_reference, x, delta, weight, eps)
