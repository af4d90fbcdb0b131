"""Fused rotary embedding + KV-cache write of one decode step: one kernel instead of six.

Legend: B rows, N query heads, K key/value heads, E head dim, T cache slots.

A one-token decode step splits its packed q/k/v projection into heads, rotates
the queries and keys (`nextstep.layers.rotary.rotate`), and writes the rotated
keys and the values into the cache slot of this step. Unfused that is a
concatenation, three elementwise kernels for the rotation and two cache
writes per layer. Here every (row, head) pair is one program that reads its
head from the projection output and writes the rotated query, or the rotated
key and the value into the cache. The slot is read from a device tensor, so a
captured CUDA graph can replay the step at every position.

Rounding follows `nextstep.layers.rotary.rotate`: ``x * cos`` is rounded to
the dtype of ``x``, then ``+ roll(x) * signed_sin`` is added in fp32 and
rounded once.
"""

from __future__ import annotations

import functools

import torch

from nextstep.kernels.triton_support import (
    block_size,
    contiguous_rows,
    dependent_launch_options,
    dispatch,
    grid_dependency_functions,
    interpreter_enabled,
    triton_module,
)
from nextstep.layers.rotary import rotate

#: ``triton.language`` and Triton's grid-dependency functions, bound when the kernel is first built.
tl = gdc_wait = gdc_launch_dependents = None

__all__ = ["rotate_into_cache", "rotate_into_cache_reference", "rotate_into_cache_triton"]


def _check(qkv, cos, signed_sin, keys, values, slot, num_heads, num_kv_heads) -> None:
    if not (isinstance(num_heads, int) and isinstance(num_kv_heads, int) and num_heads >= 1 and num_kv_heads >= 1):
        raise ValueError(f"num_heads and num_kv_heads must be integers >= 1, found {num_heads!r}, {num_kv_heads!r}")
    if keys.ndim != 4 or values.shape != keys.shape:
        raise ValueError(f"keys and values must have one shape (B, K, T, E), found {tuple(keys.shape)} and "
                         f"{tuple(values.shape)}")
    batch, kv_heads, _, head_dim = keys.shape
    if kv_heads != num_kv_heads:
        raise ValueError(f"the cache holds {kv_heads} key/value heads, expected num_kv_heads={num_kv_heads}")
    if head_dim % 2:
        raise ValueError(f"the head dim must be even for rotary embeddings, found {head_dim}")
    width = (num_heads + 2 * num_kv_heads) * head_dim
    if qkv.shape != (batch, width):
        raise ValueError(f"qkv must have shape (B, (N + 2K) * E) = ({batch}, {width}), found {tuple(qkv.shape)}")
    for name, table in (("cos", cos), ("signed_sin", signed_sin)):
        if table.shape != (batch, head_dim):
            raise ValueError(f"{name} must have shape (B, E) = ({batch}, {head_dim}), found {tuple(table.shape)}")
    if slot.shape != (1,) or slot.dtype != torch.long:
        raise ValueError(f"slot must be a (1,) int64 tensor, found {tuple(slot.shape)} {slot.dtype}")
    for name, tensor in (("cos", cos), ("signed_sin", signed_sin), ("keys", keys), ("values", values),
                         ("slot", slot)):
        if tensor.device != qkv.device:
            raise ValueError(f"{name} must be on {qkv.device} like qkv, found {tensor.device}")


def rotate_into_cache_reference(qkv: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor,
                                keys: torch.Tensor, values: torch.Tensor, slot: torch.Tensor, num_heads: int,
                                num_kv_heads: int) -> torch.Tensor:
    """Eager split, rotation and cache write.

    Args:
        qkv: one token's packed projection per row, shape (B, (N + 2K) * E): queries, keys, values.
        cos: rotary table of the token's position, shape (B, E).
        signed_sin: signed sine table (`nextstep.layers.rotary.RotaryEmbedding.signed_tables`), shape (B, E).
        keys: the layer's key cache, shape (B, K, T, E); slot ``slot`` is written.
        values: the layer's value cache, shape (B, K, T, E); slot ``slot`` is written.
        slot: the token's cache slot, shape (1,) int64.
        num_heads: N.
        num_kv_heads: K.

    Returns:
        the rotated queries, shape (B, N, E).
    """
    _check(qkv, cos, signed_sin, keys, values, slot, num_heads, num_kv_heads)
    heads = qkv.view(qkv.shape[0], num_heads + 2 * num_kv_heads, keys.shape[-1])
    rotated = rotate(heads[:, :num_heads + num_kv_heads], cos[:, None], signed_sin[:, None])  # (B, N + K, E)
    keys.index_copy_(2, slot, rotated[:, num_heads:, None].to(keys.dtype))
    values.index_copy_(2, slot, heads[:, num_heads + num_kv_heads:, None].to(values.dtype))
    return rotated[:, :num_heads].contiguous()


def _one_cache_layout(keys: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether the kernel can address both caches: shared strides, contiguous last axis."""
    return keys.stride() == values.stride() and keys.stride(-1) == 1


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
    def rotary_cache_kernel(qkv_ptr, cos_ptr, sin_ptr, query_ptr, keys_ptr, values_ptr, slot_ptr, qkv_stride,
                            cos_stride, sin_stride, query_row_stride, cache_row_stride, cache_head_stride,
                            cache_slot_stride, num_heads, num_kv_heads, num_slots, HEAD_DIM: tl.constexpr,
                            BLOCK: tl.constexpr, PDL: tl.constexpr):
        if PDL:  # launched dependently: let the next kernel start, then wait for the one ahead
            gdc_launch_dependents()
            gdc_wait()
        row = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1).to(tl.int64)  # queries 0..N-1, then keys N..N+K-1
        e = tl.arange(0, BLOCK)
        inside = e < HEAD_DIM
        partner = (e + HEAD_DIM // 2) % HEAD_DIM  # roll by E/2
        source = qkv_ptr + row * qkv_stride + head * HEAD_DIM
        x = tl.load(source + e, mask=inside, other=0.0)
        rolled = tl.load(source + partner, mask=inside, other=0.0)
        cos = tl.load(cos_ptr + row * cos_stride + e, mask=inside, other=0.0)
        sin = tl.load(sin_ptr + row * sin_stride + e, mask=inside, other=0.0)
        first = (x.to(tl.float32) * cos.to(tl.float32)).to(x.dtype)  # rounded like the unfused x * cos
        rotated = first.to(tl.float32) + rolled.to(tl.float32) * sin.to(tl.float32)
        if head < num_heads:
            tl.store(query_ptr + row * query_row_stride + head * HEAD_DIM + e,
                     rotated.to(query_ptr.dtype.element_ty), mask=inside)
        else:
            slot = tl.load(slot_ptr).to(tl.int64)
            target = row * cache_row_stride + (head - num_heads) * cache_head_stride + slot * cache_slot_stride
            # A slot past the cache is never written (the reference raises): no element is stored there.
            stored = e < tl.where(slot < num_slots, HEAD_DIM, 0)
            tl.store(keys_ptr + target + e, rotated.to(x.dtype).to(keys_ptr.dtype.element_ty), mask=stored)
            value = tl.load(source + num_kv_heads * HEAD_DIM + e, mask=inside, other=0.0)
            tl.store(values_ptr + target + e, value.to(values_ptr.dtype.element_ty), mask=stored)

    return rotary_cache_kernel


def rotate_into_cache_triton(qkv: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, keys: torch.Tensor,
                             values: torch.Tensor, slot: torch.Tensor, num_heads: int,
                             num_kv_heads: int) -> torch.Tensor:
    """The Triton kernel of `rotate_into_cache` (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``).

    The arguments are those of `rotate_into_cache_reference`; ``qkv``, ``cos``
    and ``signed_sin`` may have strided rows, and the two caches must share
    their strides, with a contiguous last axis.

    Returns:
        the rotated queries, shape (B, N, E), in the dtype of ``qkv``.
    """
    _check(qkv, cos, signed_sin, keys, values, slot, num_heads, num_kv_heads)
    if not _one_cache_layout(keys, values):
        raise ValueError(f"keys and values must share strides with a contiguous last axis, found {keys.stride()} "
                         f"and {values.stride()}")
    qkv, cos, signed_sin = contiguous_rows(qkv), contiguous_rows(cos), contiguous_rows(signed_sin)
    batch, _, _, head_dim = keys.shape
    query = torch.empty((batch, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    if batch == 0:
        return query
    grid = (batch, num_heads + num_kv_heads)
    launch = dependent_launch_options(qkv)
    _kernel(interpreter_enabled())[grid](
        qkv, cos, signed_sin, query, keys, values, slot, qkv.stride(0), cos.stride(0), signed_sin.stride(0),
        query.stride(0), keys.stride(0), keys.stride(1), keys.stride(2), num_heads, num_kv_heads, keys.shape[2],
        HEAD_DIM=head_dim, BLOCK=block_size(head_dim), num_warps=1 if head_dim <= 128 else 2, PDL=bool(launch),
        **launch)
    return query


def rotate_into_cache(qkv: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, keys: torch.Tensor,
                      values: torch.Tensor, slot: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """Rotate one token's queries and keys; write its keys and values into cache slot ``slot``.

    The Triton kernel where allowed and the two caches share one layout, the
    reference otherwise; see `rotate_into_cache_reference`.

    Returns:
        the rotated queries, shape (B, N, E).
    """
    if not _one_cache_layout(keys, values):
        return rotate_into_cache_reference(qkv, cos, signed_sin, keys, values, slot, num_heads, num_kv_heads)
    return dispatch("rotate_into_cache", qkv, rotate_into_cache_triton, rotate_into_cache_reference, qkv, cos,
                    signed_sin, keys, values, slot, num_heads, num_kv_heads)
