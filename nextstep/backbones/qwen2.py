"""A Qwen2 / Qwen2.5 decoder, weight-compatible with Hugging Face Qwen2 checkpoints.

Parameter names match ``transformers.Qwen2Model`` without the ``model.`` prefix
(``embed_tokens``, ``layers.{i}.self_attn.q_proj`` ..., ``norm``).

Legend: B batch, L query positions, S key positions, H hidden size,
N query heads, K key/value heads, E head dim, F MLP width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from nextstep.backbones.base import Backbone, KVCache
from nextstep.config import Config, require
from nextstep.layers import RMSNorm, RotaryEmbedding, apply_rotary
from nextstep.registry import register_component

ATTENTION_BACKENDS = ("sdpa", "eager")


@dataclass
class Qwen2BackboneConfig(Config):
    """Shape of a Qwen2-architecture decoder.

    Args:
        vocab_size: rows of the embedding table.
        hidden_size: H.
        intermediate_size: SwiGLU width F.
        num_layers: decoder layers.
        num_heads: query heads N.
        num_kv_heads: key/value heads K (grouped-query attention); must divide N.
        head_dim: E; ``None`` means ``hidden_size // num_heads``.
        rope_theta: rotary base.
        rms_norm_eps: RMSNorm epsilon.
        attention_bias: bias on q/k/v projections (True in Qwen2).
        output_attention_bias: bias on the output projection (False in Qwen2).
        attention_backend: ``sdpa`` (PyTorch fused attention) or ``eager`` (reference).
        gradient_checkpointing: recompute layer activations in the backward pass.
    """

    vocab_size: int = 152064
    hidden_size: int = 5120
    intermediate_size: int = 13824
    num_layers: int = 48
    num_heads: int = 40
    num_kv_heads: int = 8
    head_dim: int | None = None
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-5
    attention_bias: bool = True
    output_attention_bias: bool = False
    attention_backend: str = "sdpa"
    gradient_checkpointing: bool = False

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads"):
            require(getattr(self, name) > 0, name, getattr(self, name), "positive")
        require(self.num_heads % self.num_kv_heads == 0, "num_kv_heads", self.num_kv_heads,
                f"a divisor of num_heads={self.num_heads}")
        if self.head_dim is None:
            require(self.hidden_size % self.num_heads == 0, "hidden_size", self.hidden_size,
                    f"a multiple of num_heads={self.num_heads} when head_dim is not set")
        else:
            require(self.head_dim > 0 and self.head_dim % 2 == 0, "head_dim", self.head_dim,
                    "a positive even number")
        require(self.attention_backend in ATTENTION_BACKENDS, "attention_backend",
                self.attention_backend, f"one of {list(ATTENTION_BACKENDS)}")
        require(self.rope_theta > 0, "rope_theta", self.rope_theta, "positive")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads


def attention_mask_for(
    key_mask: torch.Tensor, query_start: int, num_queries: int
) -> torch.Tensor:
    """Boolean attention mask (B, 1, L, S): causal, padding keys hidden.

    Each query also sees its own slot, so a padding query never has an empty row
    (its output is unused but must stay finite: it is cached as a key/value).
    """
    num_keys = key_mask.shape[1]
    device = key_mask.device
    query_index = torch.arange(query_start, query_start + num_queries, device=device)[:, None]
    key_index = torch.arange(num_keys, device=device)[None, :]
    causal = key_index <= query_index  # (L, S)
    allowed = causal[None] & key_mask[:, None, :]
    allowed = allowed | (key_index == query_index)[None]
    return allowed[:, None]


class Qwen2Attention(nn.Module):
    """Grouped-query self-attention with rotary positions."""

    def __init__(self, config: Qwen2BackboneConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.resolved_head_dim
        self.backend = config.attention_backend
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden,
                                bias=config.output_attention_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None,
        layer_index: int,
        cache_start: int,
    ) -> torch.Tensor:
        """x: (B, L, H); cos/sin: (B, L, E); mask: (B, 1, L, S) bool or None (pure causal)."""
        q = rearrange(self.q_proj(x), "b l (n e) -> b n l e", e=self.head_dim)
        k = rearrange(self.k_proj(x), "b l (k e) -> b k l e", e=self.head_dim)
        v = rearrange(self.v_proj(x), "b l (k e) -> b k l e", e=self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.write(layer_index, cache_start, k, v)  # (B, K, S, E)
        out = self._attend(q, k, v, mask)  # (B, N, L, E)
        return self.o_proj(rearrange(out, "b n l e -> b l (n e)"))

    def _attend(self, q, k, v, mask):
        groups = self.num_heads // self.num_kv_heads
        if self.backend == "sdpa":
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=groups > 1
            )
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        scores = (q.float() @ k.float().transpose(-1, -2)) / self.head_dim**0.5  # (B, N, L, S)
        if mask is None:
            length = q.shape[2]
            mask = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
        return (scores.softmax(-1) @ v.float()).to(q.dtype)


class Qwen2MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: Qwen2BackboneConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, config: Qwen2BackboneConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Qwen2Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = Qwen2MLP(config)

    def forward(self, x, cos, sin, mask, cache, layer_index, cache_start):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer_index, cache_start)
        return x + self.mlp(self.post_attention_layernorm(x))


@register_component("backbone", "qwen2")
class Qwen2Backbone(Backbone):
    """Qwen2 / Qwen2.5 decoder stack with explicit positions and a static cache."""

    config_class = Qwen2BackboneConfig

    def __init__(self, config: Qwen2BackboneConfig | None = None):
        super().__init__()
        self.config = config or Qwen2BackboneConfig()
        c = self.config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(c) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.rotary = RotaryEmbedding(c.resolved_head_dim, c.rope_theta)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, L) -> (B, L, H)."""
        return self.embed_tokens(input_ids)

    def new_cache(self, batch_size: int, max_length: int, *, device=None, dtype=None) -> KVCache:
        reference = self.embed_tokens.weight
        return KVCache(
            self.config.num_layers,
            batch_size,
            max_length,
            self.config.num_kv_heads,
            self.config.resolved_head_dim,
            device=device if device is not None else reference.device,
            dtype=dtype if dtype is not None else reference.dtype,
        )

    def forward(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """embeds (B, L, H), positions (B, L) -> hidden states (B, L, H)."""
        if embeds.ndim != 3 or embeds.shape[-1] != self.hidden_size:
            raise ValueError(
                f"embeds must have shape (B, L, {self.hidden_size}), found {tuple(embeds.shape)}"
            )
        if positions.shape != embeds.shape[:2]:
            raise ValueError(
                f"positions must have shape {tuple(embeds.shape[:2])}, found {tuple(positions.shape)}"
            )
        batch, length = embeds.shape[:2]
        if attention_mask is None and cache is not None:
            attention_mask = torch.ones(batch, length, dtype=torch.bool, device=embeds.device)
        cache_start = 0
        if cache is not None:
            cache_start, cache_end = cache.reserve(attention_mask)
            mask = attention_mask_for(cache.key_mask[:, :cache_end], cache_start, length)
        elif attention_mask is not None:
            mask = attention_mask_for(attention_mask.bool(), 0, length)
        else:
            mask = None
        cos, sin = self.rotary(positions, embeds.dtype)
        x = embeds
        for index, layer in enumerate(self.layers):
            if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, cache, index, cache_start, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, index, cache_start)
        if cache is not None:
            cache.commit(cache_end)
        return self.norm(x)
