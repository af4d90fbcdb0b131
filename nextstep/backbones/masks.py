"""Which keys each query may attend to: causal order, padding, documents, and the query's own slot.

Legend: B batch, L queries, S keys.

A query at slot ``q`` sees key slot ``s`` when ``s <= q`` and slot ``s`` holds a
real token. A key mask is either boolean (True at real tokens) or integer
document ids (0 at padding, ``1, 2, ...`` for the documents packed into a row);
with ids, a query also needs its key to belong to its own document. It always
sees its own slot, even when it is padding: its output is never used, but its
keys and values are cached, so its attention row must not be empty (an empty
row gives NaN, and NaN values poison every later query through ``0 * NaN``).
"""

from __future__ import annotations

import torch


def documents_or_mask(attention_mask: torch.Tensor | None, cached: bool) -> torch.Tensor | None:
    """A backbone's ``attention_mask`` argument in the form `visible_keys` takes.

    Boolean masks pass through. Integer masks are document ids (0 at padding)
    and stay integers without a cache; with a cache they must be a 0/1 padding
    mask (packed documents are a training layout) and become boolean.

    Raises:
        ValueError: document ids above 1 together with a cache.
    """
    if attention_mask is None or attention_mask.dtype == torch.bool:
        return attention_mask
    if attention_mask.is_floating_point():
        raise ValueError(f"attention_mask must be bool or integer document ids, found {attention_mask.dtype}")
    if cached:
        if attention_mask.numel() and int(attention_mask.max()) > 1:
            raise ValueError("document ids above 1 (packed sequences) need cache=None: a cache holds one "
                             "sequence per row; pass a bool padding mask when decoding")
        return attention_mask.bool()
    return attention_mask.long()


def visible_keys(key_mask: torch.Tensor, query_slots: torch.Tensor) -> torch.Tensor:
    """Boolean visibility of keys from queries.

    Args:
        key_mask: shape (B, S): bool, True where a key slot holds a real token;
            or int64 document ids, 0 at padding.
        query_slots: shape (L,) int64, the slot of each query.

    Returns:
        shape (B, L, S) bool.
    """
    key_index = torch.arange(key_mask.shape[1], device=key_mask.device)
    causal = key_index[None, :] <= query_slots[:, None]  # (L, S)
    own = key_index[None, :] == query_slots[:, None]  # (L, S)
    if key_mask.dtype == torch.bool:
        return (causal[None] & key_mask[:, None, :]) | own[None]
    query_documents = key_mask[:, query_slots]  # (B, L)
    same = (key_mask[:, None, :] == query_documents[:, :, None]) & (key_mask[:, None, :] > 0)  # (B, L, S)
    return (causal[None] & same) | own[None]


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
        key_mask: shape (B, S) bool, True where a key slot holds a real token, or
            int64 document ids of packed sequences (0 at padding).
        query_start: slot of the first query.
        num_queries: L.

    Returns:
        shape (B, 1, L, S) bool: causal, padding keys hidden, keys of other
        documents hidden, own slot visible.
    """
    slots = torch.arange(query_start, query_start + num_queries, device=key_mask.device)
    return visible_keys(documents_or_mask(key_mask, cached=False), slots)[:, None]
