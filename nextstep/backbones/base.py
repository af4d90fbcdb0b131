"""The backbone interface and its static key/value cache.

Legend: B batch, L new positions, T cache capacity, H hidden size,
K key/value heads, E head dim.

Positions are explicit integers (B, L), so left-padded batches and CFG branches
of different prompt lengths share one code path. ``attention_mask`` (B, L) marks
real tokens (True) versus padding (False); padding is never attended to.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn


class KVCache:
    """Preallocated keys and values for every layer.

    Args:
        num_layers: layers to hold.
        batch_size: rows (B).
        max_length: capacity (T) in positions.
        num_kv_heads: key/value heads per layer (K).
        head_dim: size of one head (E).

    Attributes:
        keys, values: (layers, B, K, T, E).
        key_mask: (B, T) bool, True where a slot holds a real (non-padding) token.
        length: slots filled so far; the next write goes to ``length``.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        max_length: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, found {max_length}")
        shape = (num_layers, batch_size, num_kv_heads, max_length, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.key_mask = torch.zeros(batch_size, max_length, device=device, dtype=torch.bool)
        self.length = 0

    @property
    def max_length(self) -> int:
        return self.keys.shape[3]

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    def reserve(self, attention_mask: torch.Tensor) -> tuple[int, int]:
        """Claim the next ``L`` slots for new tokens whose validity is ``attention_mask`` (B, L).

        Returns:
            (start, end) slot range. Raises ``ValueError`` when the cache would overflow.
        """
        start, end = self.length, self.length + attention_mask.shape[1]
        if end > self.max_length:
            raise ValueError(
                f"sequence of {end} positions does not fit the cache of {self.max_length}; "
                "create the cache with a larger max_length"
            )
        if attention_mask.shape[0] != self.batch_size:
            raise ValueError(
                f"batch of {attention_mask.shape[0]} rows does not match the cache's {self.batch_size}"
            )
        self.key_mask[:, start:end] = attention_mask
        return start, end

    def write(self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, K, L, E) keys/values at ``start`` and return all up to ``start + L``."""
        end = start + keys.shape[2]
        self.keys[layer, :, :, start:end] = keys
        self.values[layer, :, :, start:end] = values
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def commit(self, end: int) -> None:
        """Mark slots up to ``end`` as filled (called once all layers have written)."""
        self.length = end

    def crop(self, length: int) -> None:
        """Forget everything after the first ``length`` slots (to reuse a prompt prefix)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"can crop to 0..{self.length} slots, found {length}")
        self.key_mask[:, length:] = False
        self.length = length

    def select_rows(self, rows: torch.Tensor) -> "KVCache":
        """A new cache holding only ``rows`` (indices into the batch), same length."""
        new = KVCache.__new__(KVCache)
        new.keys = self.keys[:, rows].clone()
        new.values = self.values[:, rows].clone()
        new.key_mask = self.key_mask[rows].clone()
        new.length = self.length
        return new


class Backbone(nn.Module, ABC):
    """A causal transformer over embeddings with explicit positions.

    Implementations own the token embedding table (text ids -> (B, L, H)) and
    return final-normalised hidden states; the LM head and image projectors live
    outside. Implement `embed`, `forward`, `new_cache` and
    the two size properties.
    """

    @property
    @abstractmethod
    def hidden_size(self) -> int:
        """H, the width of hidden states and embeddings."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Rows of the token embedding table."""

    @abstractmethod
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, L) int64 -> embeddings (B, L, H)."""

    @abstractmethod
    def forward(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Run the transformer.

        Args:
            embeds: (B, L, H) input embeddings.
            positions: (B, L) int64 rotary positions.
            attention_mask: (B, L) bool, False at padding; None means all real.
            cache: if given, keys/values are appended to it and attention covers
                everything cached before plus the causal prefix of ``embeds``.

        Returns:
            hidden states (B, L, H) after the final norm.
        """

    @abstractmethod
    def new_cache(
        self, batch_size: int, max_length: int, *, device=None, dtype: torch.dtype | None = None
    ) -> KVCache:
        """An empty `KVCache` sized for this backbone."""

    def input_embeddings(self) -> nn.Embedding:
        """The token embedding module (used to tie an LM head)."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its embedding table")


def positions_from_mask(attention_mask: torch.Tensor, offset: torch.Tensor | int = 0) -> torch.Tensor:
    """Rotary positions that skip padding: ``cumsum(mask) - 1 + offset``, clamped at ``offset``.

    Args:
        attention_mask: (B, L) bool.
        offset: (B,) or int, the number of real tokens already before this chunk.

    Returns:
        (B, L) int64.
    """
    positions = attention_mask.long().cumsum(-1) - 1
    if isinstance(offset, torch.Tensor):
        offset = offset[:, None]
    return (positions.clamp(min=0) + offset).long()
