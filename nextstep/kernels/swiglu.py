"""Fused SwiGLU activation: ``silu(gate) * up`` in one pass.

Legend: M rows, F MLP width.

The activation between a SwiGLU MLP's up and down projections (the Qwen2 MLP,
`nextstep.backbones.qwen2.Qwen2MLP`). Unfused it is a SiLU kernel and a
multiply kernel with an (M, F) intermediate in memory. ``gate`` and ``up`` may
be the two halves of one packed ``(M, 2F)`` projection output (strided rows).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from nextstep.kernels.triton_support import (
    contiguous_rows,
    dependent_launch_options,
    dispatch,
    grid_dependency_functions,
    interpreter_enabled,
    triton_module,
)

#: ``triton.language`` and Triton's grid-dependency functions, bound when the kernel is first built.
tl = gdc_wait = gdc_launch_dependents = None

__all__ = ["swiglu", "swiglu_reference", "swiglu_triton"]


def _check(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.ndim != 2:
        raise ValueError(f"gate must have shape (M, F), found {tuple(gate.shape)}")
    if up.shape != gate.shape:
        raise ValueError(f"up must have the shape of gate {tuple(gate.shape)}, found {tuple(up.shape)}")
    if up.device != gate.device:
        raise ValueError(f"up must be on {gate.device} like gate, found {up.device}")


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Eager ``silu(gate) * up`` in fp32, cast back to ``gate``'s dtype.

    Args:
        gate: shape (M, F).
        up: shape (M, F).

    Returns:
        shape (M, F).
    """
    _check(gate, up)
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


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
    def swiglu_kernel(gate_ptr, up_ptr, out_ptr, gate_row_stride, up_row_stride, out_row_stride, width,
                      BLOCK: tl.constexpr, PDL: tl.constexpr):
        if PDL:  # launched dependently: let the next kernel start, then wait for the one ahead
            gdc_launch_dependents()
            gdc_wait()
        row = tl.program_id(0).to(tl.int64)
        columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = columns < width
        gate = tl.load(gate_ptr + row * gate_row_stride + columns, mask=inside, other=0.0).to(tl.float32)
        up = tl.load(up_ptr + row * up_row_stride + columns, mask=inside, other=0.0).to(tl.float32)
        result = gate * tl.sigmoid(gate) * up
        tl.store(out_ptr + row * out_row_stride + columns, result.to(out_ptr.dtype.element_ty), mask=inside)

    return swiglu_kernel


def swiglu_triton(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton kernel of `swiglu` (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``).

    Args:
        gate: shape (M, F); rows may be strided, the last axis must be contiguous.
        up: shape (M, F), like ``gate``.
        out: optional (M, F) output with contiguous rows.

    Returns:
        shape (M, F), dtype of ``gate``.
    """
    _check(gate, up)
    gate, up = contiguous_rows(gate), contiguous_rows(up)
    rows, width = gate.shape
    if out is None:
        out = torch.empty((rows, width), dtype=gate.dtype, device=gate.device)
    elif out.shape != gate.shape or out.stride(-1) != 1:
        raise ValueError(f"out must have shape {tuple(gate.shape)} with contiguous rows, found {tuple(out.shape)}")
    if rows == 0 or width == 0:
        return out
    block = min(1024, 1 << max(0, width - 1).bit_length())
    grid = (rows, (width + block - 1) // block)
    launch = dependent_launch_options(gate)
    _kernel(interpreter_enabled())[grid](gate, up, out, gate.stride(0), up.stride(0), out.stride(0), width,
                                         BLOCK=block, num_warps=4, PDL=bool(launch), **launch)
    return out


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` computed in fp32: the Triton kernel where allowed, the reference otherwise.

    Args:
        gate: shape (M, F).
        up: shape (M, F).

    Returns:
        shape (M, F), dtype of ``gate``.
    """
    return dispatch("swiglu", gate, swiglu_triton, swiglu_reference, gate, up)
