"""Fused LayerNorm + AdaLN modulation: ``norm(x) * scale + shift`` in one pass over each row.

Legend: N rows, W width.

This is the first half of every AdaLN block of the flow-matching head in its
folded form (`nextstep.layers.adaln.AdaLNResBlock.folded_modulation_parameters`
moves the LayerNorm's affine into ``scale`` and ``shift``). Unfused it is a
LayerNorm kernel and a multiply-add kernel with an intermediate row in memory;
fused, one program per row reads ``x``, ``scale`` and ``shift`` once and writes
the result once. Statistics are computed in fp32 whatever the input dtype.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from nextstep.kernels.triton_support import block_size, contiguous_rows, dispatch, interpreter_enabled, triton_module

#: ``triton.language``, bound when the kernel is first built.
tl = None

__all__ = ["layer_norm_modulate", "layer_norm_modulate_reference", "layer_norm_modulate_triton"]


def _check(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> None:
    if x.ndim != 2:
        raise ValueError(f"x must have shape (N, W), found {tuple(x.shape)}")
    for name, tensor in (("shift", shift), ("scale", scale)):
        if tensor.shape != x.shape:
            raise ValueError(f"{name} must have the shape of x {tuple(x.shape)}, found {tuple(tensor.shape)}")
        if tensor.device != x.device:
            raise ValueError(f"{name} must be on {x.device} like x, found {tensor.device}")


def layer_norm_modulate_reference(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """Eager PyTorch ``LayerNorm(x) * scale + shift`` (LayerNorm without affine), in fp32, cast back.

    Args:
        x: rows to normalise, shape (N, W).
        shift: added after scaling, shape (N, W).
        scale: multiplies the normalised rows, shape (N, W).
        eps: added to the variance.

    Returns:
        shape (N, W), dtype of ``x``.
    """
    _check(x, shift, scale)
    normed = F.layer_norm(x.float(), x.shape[-1:], eps=eps)
    return torch.addcmul(shift.float(), normed, scale.float()).to(x.dtype)


@functools.cache
def _kernel(interpret: bool):
    """Build the Triton kernel (once per interpreter setting)."""
    global tl  # Triton's interpreter patches the `triton.language` it finds among the kernel's globals
    triton = triton_module()
    import triton.language as tl

    @triton.jit
    def layer_norm_modulate_kernel(x_ptr, shift_ptr, scale_ptr, out_ptr, x_row_stride, shift_row_stride,
                                   scale_row_stride, out_row_stride, width, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        columns = tl.arange(0, BLOCK)
        inside = columns < width
        # bf16 / fp16 rows are upcast on load: every statistic and product is fp32.
        x = tl.load(x_ptr + row * x_row_stride + columns, mask=inside, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / width
        centred = tl.where(inside, x - mean, 0.0)
        variance = tl.sum(centred * centred, axis=0) / width
        normed = centred * tl.rsqrt(variance + eps)
        shift = tl.load(shift_ptr + row * shift_row_stride + columns, mask=inside, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + row * scale_row_stride + columns, mask=inside, other=0.0).to(tl.float32)
        result = normed * scale + shift
        tl.store(out_ptr + row * out_row_stride + columns, result.to(out_ptr.dtype.element_ty), mask=inside)

    return layer_norm_modulate_kernel


def layer_norm_modulate_triton(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Triton kernel of `layer_norm_modulate` (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``).

    Args:
        x: shape (N, W); rows may be strided, the last axis must be contiguous or is copied.
        shift: shape (N, W), for example a strided view into a modulation table.
        scale: shape (N, W).
        eps: added to the variance.
        out: optional (N, W) output with contiguous rows; a new tensor of ``x``'s dtype otherwise.

    Returns:
        shape (N, W).
    """
    _check(x, shift, scale)
    x, shift, scale = contiguous_rows(x), contiguous_rows(shift), contiguous_rows(scale)
    rows, width = x.shape
    if out is None:
        out = torch.empty((rows, width), dtype=x.dtype, device=x.device)
    elif out.shape != x.shape or out.stride(-1) != 1:
        raise ValueError(f"out must have shape {tuple(x.shape)} with contiguous rows, found {tuple(out.shape)}")
    if rows == 0:
        return out
    block = block_size(width)
    _kernel(interpreter_enabled())[(rows,)](
        x, shift, scale, out, x.stride(0), shift.stride(0), scale.stride(0), out.stride(0), width, float(eps),
        BLOCK=block, num_warps=4 if block <= 2048 else 8,
    )
    return out


def layer_norm_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """``LayerNorm(x) * scale + shift`` per row (LayerNorm without affine, statistics in fp32).

    Runs the Triton kernel where `nextstep.kernels.triton_support.dispatch`
    allows it and the eager reference otherwise; both agree to rounding.

    Args:
        x: rows to normalise, shape (N, W).
        shift: shape (N, W).
        scale: shape (N, W).
        eps: added to the variance.

    Returns:
        shape (N, W), dtype of ``x``.
    """
    return dispatch("layer_norm_modulate", x, layer_norm_modulate_triton, layer_norm_modulate_reference,
                    x, shift, scale, eps)
