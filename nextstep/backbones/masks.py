"""Which keys each query may attend to: causal order, padding, and the query's own slot.

Legend: B batch, L queries, S keys.

A query at slot ``q`` sees key slot ``s`` when ``s <= q`` and slot ``s`` holds a
real token. It always sees its own slot, even when it is padding: its output is
never used, but its keys and values are cached, so its attention row must not be
empty (an empty row gives NaN, and NaN values poison every later query through
``0 * NaN``).
"""

from __future__ import annotations

import torch


def visible_keys(key_mask: torch.Tensor, query_slots: torch.Tensor) -> torch.Tensor:
    """Boolean visibility of keys from queries.

    Args:
        key_mask: shape (B, S) bool, True where a key slot holds a real token.
        query_slots: shape (L,) int64, the slot of each query.

    Returns:
        shape (B, L, S) bool.
    """
    key_index = torch.arange(key_mask.shape[1], device=key_mask.device)
    causal = key_index[None, :] <= query_slots[:, None]  # (L, S)
    own = key_index[None, :] == query_slots[:, None]  # (L, S)
    return (causal[None] & key_mask[:, None, :]) | own[None]


def decode_visible_keys(key_mask: torch.Tensor, query_slot: torch.Tensor) -> torch.Tensor:
    """`visible_keys` for a single query with no real key after it (a decode step), in one kernel.

    Args:
        key_mask: shape (B, S) bool; no True after ``query_slot``.
        query_slot: shape (1,) int64.

    Returns:
        shape (B, 1, S) bool.
    """
    return key_mask.index_fill(1, query_slot, True)[:, None]


def attention_mask_for(key_mask: torch.Tensor, query_start: int, num_queries: int) -> torch.Tensor:
    """Boolean attention mask for queries in consecutive slots.

    Args:
        key_mask: shape (B, S) bool, True where a key slot holds a real token.
        query_start: slot of the first query.
        num_queries: L.

    Returns:
        shape (B, 1, L, S) bool: causal, padding keys hidden, own slot visible.
    """
    slots = torch.arange(query_start, query_start + num_queries, device=key_mask.device)
    return visible_keys(key_mask.bool(), slots)[:, None]
