"""Attention kernels behind one interface: PyTorch SDPA (default), eager (reference), xformers.

Legend: B batch, N query heads, K key/value heads (dividing N), G = N / K query
heads per key/value head, L queries, S keys, E head dim.

All three agree to float rounding; pick one with
``Qwen2BackboneConfig.attention_backend`` or `attention_backend`.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange

from nextstep.backbones.base import AttentionBackend


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean visibility -> additive bias (0 where allowed, -inf elsewhere).

    Args:
        allowed: bool, any shape.
        dtype: dtype of the bias.

    Returns:
        bias of the same shape.
    """
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return bias.masked_fill_(allowed.logical_not(), float("-inf"))


class SDPAAttention(AttentionBackend):
    """``torch.nn.functional.scaled_dot_product_attention``: PyTorch picks the fused kernel."""

    name = "sdpa"

    def prepare_mask(self, allowed: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """(B, L, S) bool -> (B, 1, L, S) additive bias, converted once for all layers; None stays None."""
        if allowed is None:
            return None
        return additive_mask(allowed, dtype)[:, None]

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 mask: torch.Tensor | None) -> torch.Tensor:
        batch, num_heads, length, head_dim = query.shape
        num_kv_heads = key.shape[1]
        grouped = num_heads != num_kv_heads
        if mask is None:
            return F.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=grouped)
        if length == 1 and grouped:
            # One query per head: the G heads of a group become G queries against the
            # same K heads, so no kernel has to expand the cached keys and values.
            folded = query.reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
            out = F.scaled_dot_product_attention(folded, key, value, attn_mask=mask)
            return out.reshape(batch, num_heads, 1, head_dim)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=grouped)


class EagerAttention(AttentionBackend):
    """Plain PyTorch in fp32: scores, softmax, weighted sum. The reference the others are checked against."""

    name = "eager"

    def prepare_mask(self, allowed: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """(B, L, S) bool -> (B, 1, L, S) fp32 additive bias; None stays None (causal)."""
        if allowed is None:
            return None
        return additive_mask(allowed, torch.float32)[:, None]

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 mask: torch.Tensor | None) -> torch.Tensor:
        num_kv_heads = key.shape[1]
        length, num_keys = query.shape[2], key.shape[2]
        if mask is None:
            causal = torch.ones(length, num_keys, dtype=torch.bool, device=query.device).tril()
            mask = additive_mask(causal, torch.float32)[None, None]
        grouped = rearrange(query.float(), "b (k g) l e -> b k g l e", k=num_kv_heads)
        scores = torch.einsum("bkgle,bkse->bkgls", grouped, key.float()) * query.shape[-1] ** -0.5
        scores = scores + mask[:, :, None]  # (B, 1, 1, L, S) broadcast over heads
        weights = scores.softmax(dim=-1)
        out = torch.einsum("bkgls,bkse->bkgle", weights, value.float())
        return rearrange(out, "b k g l e -> b (k g) l e").to(query.dtype)


def xformers_available() -> bool:
    """Whether the optional ``xformers`` package (the ``gpu`` extra) can be imported."""
    return importlib.util.find_spec("xformers") is not None


class XFormersAttention(AttentionBackend):
    """``xformers.ops.memory_efficient_attention`` (CUDA tensors only).

    Raises:
        ImportError: when xformers is not installed.
    """

    name = "xformers"

    def __init__(self):
        if not xformers_available():
            raise ImportError(
                "attention_backend 'xformers' needs the xformers package, which is not installed; "
                "install the gpu extra (pip install 'nextstep[gpu]') or choose attention_backend "
                "'sdpa' or 'eager'"
            )
        import xformers.ops

        self._ops = xformers.ops

    def prepare_mask(self, allowed: torch.Tensor | None, dtype: torch.dtype) -> Any:
        """(B, L, S) bool -> (B, 1, 1, L, S) additive bias; None -> xformers' causal mask."""
        if allowed is None:
            return self._ops.LowerTriangularMask()
        batch, length, num_keys = allowed.shape
        # xformers wants the bias rows 8-element aligned: slice a padded allocation.
        padded = -(-num_keys // 8) * 8
        bias = torch.zeros(batch, 1, 1, length, padded, dtype=dtype, device=allowed.device)
        bias = bias[..., :num_keys]
        return bias.masked_fill_(allowed.logical_not()[:, None, None], float("-inf"))

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any) -> torch.Tensor:
        batch, num_heads, length, head_dim = query.shape
        num_kv_heads, num_keys = key.shape[1], key.shape[2]
        groups = num_heads // num_kv_heads
        # xformers' grouped layout: (B, L, K, G, E) queries, keys expanded over G without a copy.
        grouped_query = rearrange(query, "b (k g) l e -> b l k g e", k=num_kv_heads)
        shape = (batch, num_keys, num_kv_heads, groups, head_dim)
        grouped_key = key.transpose(1, 2)[:, :, :, None].expand(shape)
        grouped_value = value.transpose(1, 2)[:, :, :, None].expand(shape)
        if isinstance(mask, torch.Tensor):
            mask = mask.expand(batch, num_kv_heads, groups, length, num_keys)
        out = self._ops.memory_efficient_attention(grouped_query, grouped_key, grouped_value, attn_bias=mask)
        return rearrange(out, "b l k g e -> b (k g) l e")


ATTENTION_BACKENDS: dict[str, type[AttentionBackend]] = {
    "sdpa": SDPAAttention,
    "eager": EagerAttention,
    "xformers": XFormersAttention,
}


def attention_backend(name: str) -> AttentionBackend:
    """The attention kernel registered as ``name`` (one of `ATTENTION_BACKENDS`).

    Raises:
        ValueError: for an unknown name.
        ImportError: for ``xformers`` when it is not installed.
    """
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {sorted(ATTENTION_BACKENDS)}, found {name!r}")
    return ATTENTION_BACKENDS[name]()
