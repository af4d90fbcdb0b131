"""Fused guidance combine + solver update: one pass from per-branch velocities to the next state.

Legend: G guidance branches, R rows (tokens sampled together), D token dim.

Every solver stage of the samplers the fast path supports has the form::

    v   = sum_g weights[g] * predictions[g]          # guidance (CFG, editing CFG, none)
    out = a * state + b * v + c * extra              # solver update

with ``(a, b, c) = coefficients``:

| stage | a | b | c | extra |
|---|---|---|---|---|
| Euler step | 1 | dt | 0 | - |
| Euler-Maruyama step (release v1) | 1 - dt | (1 + t) dt | sqrt(2 (1 - t) dt) | standard normal noise |
| Heun / midpoint predictor | 1 | dt or dt/2 | 0 | - (the velocity is kept) |
| Heun corrector | 1 | dt/2 | dt/2 | the predictor's velocity |
| Adams-Bashforth step | 1 | dt (1 + r/2) | -dt r/2 | the previous step's velocity (then replaced by this one's) |

The Euler-Maruyama row is the release's ``x + (v + (1 - t) * score) dt + sqrt(2 (1 - t)) sqrt(dt) eps``
with ``score = (t v - x) / (1 - t)`` written out. Two-way CFG ``v_u + s (v_c - v_u)``
has weights ``(s, 1 - s)``; editing's three-way combination has
``(s, s_img - s, 1 - s_img)``. Weights and coefficients are tensors read by
the kernel, so a captured CUDA graph serves every scale and every time grid:
the caller rewrites the small tables in place between replays.
"""

from __future__ import annotations

import functools

import torch
from einops import rearrange

from nextstep.kernels.triton_support import dispatch, interpreter_enabled, triton_module

#: ``triton.language``, bound when the kernel is first built.
tl = None

__all__ = ["guided_update", "guided_update_reference", "guided_update_triton"]


def _check(predictions, state, weights, coefficients, extra, out, velocity_out) -> int:
    """Validate shapes; return G."""
    if state.ndim != 2:
        raise ValueError(f"state must have shape (R, D), found {tuple(state.shape)}")
    rows, dim = state.shape
    if weights.ndim != 1 or weights.numel() < 1:
        raise ValueError(f"weights must have shape (G,) with G >= 1, found {tuple(weights.shape)}")
    branches = weights.shape[0]
    if predictions.shape != (branches * rows, dim):
        raise ValueError(
            f"predictions must have shape (G * R, D) = ({branches * rows}, {dim}) for {branches} "
            f"branch weight(s) and state {tuple(state.shape)}, found {tuple(predictions.shape)}"
        )
    if coefficients.shape != (3,):
        raise ValueError(f"coefficients must have shape (3,) = (a, b, c), found {tuple(coefficients.shape)}")
    for name, tensor in (("extra", extra), ("out", out), ("velocity_out", velocity_out)):
        if tensor is not None and tensor.shape != state.shape:
            raise ValueError(f"{name} must have the shape of state {tuple(state.shape)}, found {tuple(tensor.shape)}")
    for name, tensor in (("predictions", predictions), ("weights", weights), ("coefficients", coefficients),
                         ("extra", extra), ("out", out), ("velocity_out", velocity_out)):
        if tensor is not None and tensor.device != state.device:
            raise ValueError(f"{name} must be on {state.device} like state, found {tensor.device}")
    return branches


def guided_update_reference(
    predictions: torch.Tensor,
    state: torch.Tensor,
    weights: torch.Tensor,
    coefficients: torch.Tensor,
    extra: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    velocity_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eager PyTorch version of `guided_update`, in fp32; no host synchronisation (capturable).

    Args:
        predictions: velocity of every branch, shape (G * R, D), branch-major.
        state: the state the update starts from, shape (R, D).
        weights: branch weights, shape (G,).
        coefficients: ``(a, b, c)``, shape (3,).
        extra: the ``c`` term's tensor (noise or a kept velocity), shape (R, D), or None.
        out: where to write the new state, shape (R, D) (may be ``state`` itself).
        velocity_out: where to write the guided velocity ``v``, shape (R, D), or None (may be
            ``extra`` itself: each element is read before it is written).

    Returns:
        the new state, shape (R, D), in ``out`` or a new tensor of ``state``'s dtype.
    """
    branches = _check(predictions, state, weights, coefficients, extra, out, velocity_out)
    per_branch = rearrange(predictions.float(), "(g r) d -> g r d", g=branches)
    velocity = torch.einsum("g,grd->rd", weights.float(), per_branch)
    a, b, c = coefficients.float().unbind(0)
    result = torch.addcmul(state.float() * a, velocity, b)
    if extra is not None:
        result = torch.addcmul(result, extra.float(), c)
    if velocity_out is not None:
        velocity_out.copy_(velocity)
    if out is None:
        return result.to(state.dtype)
    return out.copy_(result)


@functools.cache
def _kernel(interpret: bool):
    """Build the Triton kernel (once per interpreter setting)."""
    global tl  # Triton's interpreter patches the `triton.language` it finds among the kernel's globals
    triton = triton_module()
    import triton.language as tl

    @triton.jit
    def guided_update_kernel(predictions_ptr, state_ptr, weights_ptr, coefficients_ptr, extra_ptr, out_ptr,
                             velocity_ptr, rows, dim, BRANCHES: tl.constexpr, HAS_EXTRA: tl.constexpr,
                             KEEP_VELOCITY: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = columns < dim
        offsets = row * dim + columns
        velocity = tl.zeros((BLOCK,), dtype=tl.float32)
        for branch in tl.static_range(BRANCHES):
            weight = tl.load(weights_ptr + branch).to(tl.float32)
            prediction = tl.load(predictions_ptr + branch * rows * dim + offsets, mask=inside, other=0.0)
            velocity += weight * prediction.to(tl.float32)
        a = tl.load(coefficients_ptr).to(tl.float32)
        b = tl.load(coefficients_ptr + 1).to(tl.float32)
        state = tl.load(state_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        result = a * state + b * velocity
        if HAS_EXTRA:
            c = tl.load(coefficients_ptr + 2).to(tl.float32)
            extra = tl.load(extra_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
            result += c * extra
        if KEEP_VELOCITY:
            tl.store(velocity_ptr + offsets, velocity.to(velocity_ptr.dtype.element_ty), mask=inside)
        tl.store(out_ptr + offsets, result.to(out_ptr.dtype.element_ty), mask=inside)

    return guided_update_kernel


def guided_update_triton(
    predictions: torch.Tensor,
    state: torch.Tensor,
    weights: torch.Tensor,
    coefficients: torch.Tensor,
    extra: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    velocity_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Triton kernel of `guided_update` (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``).

    Tensors must be contiguous; arguments are those of `guided_update_reference`.

    Args:
        predictions: shape (G * R, D).
        state: shape (R, D).
        weights: shape (G,).
        coefficients: shape (3,).
        extra: shape (R, D), or None.
        out: shape (R, D), or None.
        velocity_out: shape (R, D), or None.

    Returns:
        the new state, shape (R, D).
    """
    branches = _check(predictions, state, weights, coefficients, extra, out, velocity_out)
    for name, tensor in (("predictions", predictions), ("state", state), ("weights", weights),
                         ("coefficients", coefficients), ("extra", extra), ("out", out),
                         ("velocity_out", velocity_out)):
        if tensor is not None and not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous for the Triton kernel")
    rows, dim = state.shape
    if out is None:
        out = torch.empty_like(state)
    if rows == 0:
        return out
    block = min(1024, 1 << max(0, dim - 1).bit_length())
    grid = (rows, (dim + block - 1) // block)
    _kernel(interpreter_enabled())[grid](
        predictions, state, weights, coefficients, state if extra is None else extra, out,
        out if velocity_out is None else velocity_out, rows, dim,
        BRANCHES=branches, HAS_EXTRA=extra is not None, KEEP_VELOCITY=velocity_out is not None,
        BLOCK=block, num_warps=1 if block <= 256 else 4,
    )
    return out


def guided_update(
    predictions: torch.Tensor,
    state: torch.Tensor,
    weights: torch.Tensor,
    coefficients: torch.Tensor,
    extra: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    velocity_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out = a * state + b * sum_g(weights[g] * predictions[g]) + c * extra``, computed in fp32.

    Runs the Triton kernel where `nextstep.kernels.triton_support.dispatch`
    allows it (and every tensor is contiguous), the eager reference otherwise.

    Args:
        predictions: velocity of every branch, shape (G * R, D), branch-major
            (``[cond rows; uncond rows; ...]``), any float dtype.
        state: the state the update starts from, shape (R, D).
        weights: branch weights, shape (G,) (see the module docstring).
        coefficients: ``(a, b, c)`` of the solver stage, shape (3,).
        extra: noise or a kept velocity for the ``c`` term, shape (R, D), or None.
        out: where to write the new state (may be ``state``), shape (R, D), or None.
        velocity_out: where to keep the guided velocity, shape (R, D), or None (may be ``extra``).

    Returns:
        the new state, shape (R, D).
    """
    tensors = (predictions, state, weights, coefficients, extra, out, velocity_out)
    if not all(t is None or t.is_contiguous() for t in tensors):
        return guided_update_reference(predictions, state, weights, coefficients, extra, out=out,
                                       velocity_out=velocity_out)
    return dispatch("guided_update", state, guided_update_triton, guided_update_reference, predictions, state,
                    weights, coefficients, extra, out=out, velocity_out=velocity_out)
