"""The backbone interface, its cache interface, the static key/value cache and the attention-kernel interface.

Legend: B batch, L new positions, S key positions, T cache capacity, H hidden size,
N query heads, K key/value heads, E head dim.

Positions are explicit integers (B, L), so left-padded batches and CFG branches
of different prompt lengths share one code path. ``attention_mask`` (B, L) marks
real tokens (True) versus padding (False); padding is never attended to. For
packed training rows it may instead hold int64 document ids (0 at padding,
``1, 2, ...`` for the sequences packed into the row): a token then attends only
within its own document.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from nextstep.config import as_integer, described
from nextstep.dtypes import is_integer_dtype


class BackboneCache(ABC):
    """What generation needs from a backbone's decoding state, whatever its storage.

    A cache has a fixed capacity (`max_length` slots per row) and a fill level
    (`length`). A backbone's ``forward`` appends to it; `crop` and `select_rows`
    let a caller reuse a prompt prefix or fan one prompt out to several rows
    (for example the branches of classifier-free guidance).
    """

    @property
    @abstractmethod
    def length(self) -> int:
        """Slots filled so far; the next token goes to slot ``length``."""

    @property
    @abstractmethod
    def max_length(self) -> int:
        """Capacity T in slots."""

    @property
    @abstractmethod
    def batch_size(self) -> int:
        """Rows B."""

    @abstractmethod
    def crop(self, length: int) -> None:
        """Forget everything after the first ``length`` slots."""

    @abstractmethod
    def select_rows(self, rows: torch.Tensor) -> "BackboneCache":
        """A new cache holding ``rows`` (int64 indices into the batch; repeats allowed)."""

    def check_crop_length(self, length) -> int:
        """``length`` as an int in ``0..self.length`` (any integer type: Python, NumPy, a 0-d tensor);
        ``ValueError`` naming what was found otherwise (a bool too)."""
        value = as_integer(length)
        if value is None or not 0 <= value <= self.length:
            raise ValueError(f"can crop to an integer in 0..{self.length} slots, found {described(length)}")
        return value

    def check_rows(self, rows, device: torch.device | str | None = None) -> torch.Tensor:
        """``rows`` as (R,) int64 indices into the batch on ``device``; ``ValueError`` naming what was found
        for an empty, non-1-D or out-of-range index, and for booleans or floats (a keep-mask selects
        with ``mask.nonzero().flatten()``)."""
        found = torch.as_tensor(rows, device=device)
        if found.ndim != 1 or found.numel() == 0:
            raise ValueError(f"rows must be a non-empty 1-D index, found shape {tuple(found.shape)}")
        if not is_integer_dtype(found.dtype):
            raise ValueError(f"rows must be integer indices into the batch, found {found.dtype} (a keep-mask "
                             "selects with mask.nonzero().flatten())")
        found = found.long()
        if int(found.min()) < 0 or int(found.max()) >= self.batch_size:
            raise ValueError(f"rows must lie in 0..{self.batch_size - 1}, found {found.tolist()}")
        return found


class KVCache(BackboneCache):
    """Preallocated keys and values for every layer (the static cache).

    Memory is allocated once for (B, T); a forward call claims the next ``L``
    slots with `reserve`, each layer writes its keys and values into them, and
    `commit` advances the fill level. Nothing is reallocated while decoding.

    Args:
        num_layers: layers to hold.
        batch_size: rows (B).
        max_length: capacity (T) in positions.
        num_kv_heads: key/value heads per layer (K).
        head_dim: size of one head (E).
        device: where the tensors live.
        dtype: dtype of keys and values; must match the hidden states.

    Attributes:
        keys: (layers, B, K, T, E).
        values: (layers, B, K, T, E).
        key_mask: (B, T) bool, True where a slot holds a real (non-padding) token.
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
        for name, value in (("num_layers", num_layers), ("batch_size", batch_size),
                            ("max_length", max_length), ("num_kv_heads", num_kv_heads),
                            ("head_dim", head_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, found {value!r}")
        shape = (num_layers, batch_size, num_kv_heads, max_length, head_dim)
        # Plain tensors even when created under torch.inference_mode, so that the
        # cache can be cropped or copied outside it.
        with torch.inference_mode(False):
            keys = torch.zeros(shape, device=device, dtype=dtype)
            values = torch.zeros(shape, device=device, dtype=dtype)
            key_mask = torch.zeros(batch_size, max_length, device=device, dtype=torch.bool)
        self._set_storage(keys, values, key_mask, 0)

    def _set_storage(self, keys: torch.Tensor, values: torch.Tensor, key_mask: torch.Tensor, length: int) -> None:
        self.keys, self.values, self.key_mask = keys, values, key_mask
        self._length = length
        # Per-layer views, built once: indexing ``keys[layer]`` on every step costs time.
        # (``select`` rather than ``unbind``: autograd forbids in-place writes into
        # the outputs of a multi-output view.)
        self.layers: tuple[tuple[torch.Tensor, torch.Tensor], ...] = tuple(
            (keys[index], values[index]) for index in range(keys.shape[0])
        )
        if keys.device.type == "cuda":
            # CUDA graphs (torch.compile's reduce-overhead mode) may then write into
            # these tensors in place; guard=False keeps one compiled graph for every cache.
            for tensor in (key_mask, *(view for pair in self.layers for view in pair)):
                torch._dynamo.mark_static_address(tensor, guard=False)

    @property
    def length(self) -> int:
        return self._length

    @length.setter
    def length(self, value: int) -> None:
        self._length = value

    @property
    def max_length(self) -> int:
        return self.keys.shape[3]

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    @property
    def num_layers(self) -> int:
        return self.keys.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.keys.dtype

    @property
    def device(self) -> torch.device:
        return self.keys.device

    def reserve(self, attention_mask: torch.Tensor | None, length: int | None = None) -> tuple[int, int]:
        """Claim the next ``L`` slots for new tokens and record which of them are real.

        Args:
            attention_mask: (B, L) bool, False at padding; None means all real
                (then ``length`` gives L).
            length: L when ``attention_mask`` is None.

        Returns:
            (start, end) slot range. Raises ``ValueError`` when the tokens would
            overflow the cache or the batch size differs.
        """
        if attention_mask is not None:
            if attention_mask.ndim != 2:
                raise ValueError(
                    f"attention_mask must have shape (B, L), found {tuple(attention_mask.shape)}"
                )
            rows, length = attention_mask.shape
            if rows != self.batch_size:
                raise ValueError(
                    f"batch of {rows} rows does not match the cache's {self.batch_size} rows"
                )
        elif length is None:
            raise ValueError("reserve needs an attention_mask or a length")
        start, end = self._length, self._length + length
        if end > self.max_length:
            raise ValueError(
                f"sequence of {end} positions does not fit the cache of {self.max_length} "
                f"({start} already filled, {length} new); create the cache with a larger max_length"
            )
        if attention_mask is None:
            self.key_mask[:, start:end] = True
        else:
            self.key_mask[:, start:end] = attention_mask
        return start, end

    def write(
        self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one layer's keys/values at ``start`` and return everything up to ``start + L``.

        Args:
            layer: layer index.
            start: first slot, from `reserve`.
            keys: shape (B, K, L, E).
            values: shape (B, K, L, E).

        Returns:
            keys and values of slots ``[0, start + L)``, each (B, K, start + L, E).
        """
        end = start + keys.shape[2]
        layer_keys, layer_values = self.layers[layer]
        layer_keys[:, :, start:end] = keys
        layer_values[:, :, start:end] = values
        return layer_keys[:, :, :end], layer_values[:, :, :end]

    def commit(self, end: int) -> None:
        """Mark slots up to ``end`` as filled (called once all layers have written)."""
        self._length = end

    def crop(self, length: int) -> None:
        """Forget everything after the first ``length`` slots, to reuse a prompt prefix.

        The next forward call writes from slot ``length`` on. Stale keys past it
        are masked out and overwritten, never attended to.
        """
        length = self.check_crop_length(length)
        self.key_mask[:, length:] = False
        self._length = length

    def reset(self) -> None:
        """Empty the cache (keeps its memory)."""
        self.crop(0)

    def select_rows(self, rows: torch.Tensor | list[int]) -> "KVCache":
        """A new cache holding ``rows`` of this one (copied), with the same length and capacity.

        Repeated indices fan one prefilled prompt out to several rows, for
        example ``cache.select_rows([0, 0])`` for a conditional and an
        unconditional branch that share their prefix.

        Args:
            rows: int64 indices into the batch, shape (R,).
        """
        rows = self.check_rows(rows, self.keys.device)
        new = KVCache.__new__(KVCache)
        with torch.inference_mode(False):
            new._set_storage(self.keys[:, rows].clone(), self.values[:, rows].clone(),
                             self.key_mask[rows].clone(), self._length)
        return new

    def clone(self) -> "KVCache":
        """An independent copy (for example to branch off a shared prompt)."""
        return self.select_rows(torch.arange(self.batch_size))

    def __repr__(self) -> str:
        layers, batch, heads, capacity, head_dim = self.keys.shape
        return (f"KVCache(layers={layers}, batch={batch}, kv_heads={heads}, head_dim={head_dim}, "
                f"length={self._length}/{capacity}, dtype={self.keys.dtype}, device={self.keys.device})")


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
        cache: BackboneCache | None = None,
    ) -> torch.Tensor:
        """Run the transformer.

        Args:
            embeds: (B, L, H) input embeddings.
            positions: (B, L) int64 rotary positions.
            attention_mask: (B, L) bool, False at padding; None means all real.
                Without a cache it may also be (B, L) int64 document ids (0 at
                padding): each token then attends only to earlier tokens of its
                own document (packed sequences).
            cache: if given, keys/values are appended to it and attention covers
                everything cached before plus the causal prefix of ``embeds``.
                Caches serve inference: gradients do not flow through what
                a cache holds (`Qwen2Backbone` refuses a cache while
                gradients are on; `HFBackbone` follows transformers, which
                allows it).

        Returns:
            hidden states (B, L, H) after the final norm.
        """

    @abstractmethod
    def new_cache(
        self, batch_size: int, max_length: int, *, device=None, dtype: torch.dtype | None = None
    ) -> BackboneCache:
        """An empty cache sized for this backbone (a `KVCache` for native backbones)."""

    def input_embeddings(self) -> nn.Embedding:
        """The token embedding module (used to tie an LM head)."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its embedding table")

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute layer activations in the backward pass (``enabled``) or keep them.

        The default replaces ``config.gradient_checkpointing``, for backbones whose
        forward reads that field; the config then says what the backbone does, and
        a saved model loads the same way.

        Raises:
            ValueError: a backbone without a ``gradient_checkpointing`` config field.
        """
        config = getattr(self, "config", None)
        if config is None or not hasattr(config, "gradient_checkpointing"):
            raise ValueError(f"backbone {type(self).__name__} has no 'gradient_checkpointing' config field")
        self.config = config.replace(gradient_checkpointing=bool(enabled))

    def decoder_layers(self) -> list[nn.Module]:
        """The repeated decoder layers, in order (FSDP shards each as its own unit).

        The default: the modules of a ``layers`` attribute, or none.
        """
        layers = getattr(self, "layers", None)
        return list(layers) if layers is not None else []

    def set_input_embeddings(self, embeddings: nn.Embedding) -> None:
        """Replace the token embedding table (V', H), for a new text vocabulary.

        The backbone's config must describe the new table afterwards, so that a
        saved model loads again; `vocab_size` becomes V'.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot replace its embedding table")


class AttentionBackend(ABC):
    """One attention kernel: scaled dot-product attention with grouped key/value heads.

    A backbone calls `prepare_mask` once per forward call and reuses the result
    in every layer, so that mask conversion is not paid per layer.
    """

    #: name used in configs (``attention_backend``).
    name: str = ""

    @abstractmethod
    def prepare_mask(self, allowed: torch.Tensor | None, dtype: torch.dtype) -> Any:
        """Turn a boolean visibility mask into what `__call__` takes.

        Args:
            allowed: (B, L, S) bool, True where query ``l`` may attend to key
                ``s``; None means plain causal attention with S == L.
            dtype: dtype of the queries.
        """

    @abstractmethod
    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any) -> torch.Tensor:
        """Attend.

        Args:
            query: shape (B, N, L, E).
            key: shape (B, K, S, E), K dividing N.
            value: shape (B, K, S, E).
            mask: the result of `prepare_mask`.

        Returns:
            the attended values, shape (B, N, L, E).
        """


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Raise ``ValueError`` naming the range and the ids found unless every id of ``input_ids`` lies in
    ``[0, vocab_size)``; checked for ids on the CPU only, so that ids on an accelerator are not waited for."""
    if input_ids.device.type != "cpu" or input_ids.numel() == 0:
        return
    low, high = (int(value) for value in torch.aminmax(input_ids))
    if low < 0 or high >= vocab_size:
        raise ValueError(f"input_ids must lie in [0, {vocab_size}) (the embedding table's rows), found ids from "
                         f"{low} to {high}")


def positions_from_mask(attention_mask: torch.Tensor, offset: torch.Tensor | int = 0) -> torch.Tensor:
    """Rotary positions that skip padding, and restart at every document of a packed row.

    A boolean mask gives ``cumsum(mask) - 1 + offset``, clamped at ``offset``
    (left or right padding). Integer document ids (0 at padding) give each
    token the number of earlier tokens of its document plus ``offset``, and
    padding ``offset``.

    Args:
        attention_mask: (B, L) bool, or (B, L) int64 document ids.
        offset: (B,) or int, the number of real tokens already before this chunk.

    Returns:
        (B, L) int64.
    """
    if isinstance(offset, torch.Tensor):
        if offset.shape != attention_mask.shape[:1]:
            raise ValueError(f"offset must be an int or have shape ({attention_mask.shape[0]},), one per row, "
                             f"found shape {tuple(offset.shape)}")
        offset = offset[:, None]
    if attention_mask.dtype == torch.bool:
        positions = attention_mask.long().cumsum(-1) - 1
        return (positions.clamp(min=0) + offset).long()
    documents = attention_mask.long()
    # Rank of each token among the tokens of its document: sort the ids (stable, so
    # each document keeps its order), count from each run's start, scatter back.
    ordered, order = documents.sort(dim=-1, stable=True)
    index = torch.arange(documents.shape[1], device=documents.device).expand_as(documents)
    previous = torch.nn.functional.pad(ordered[:, :-1], (1, 0), value=-1)
    starts = torch.where(ordered != previous, index, torch.zeros_like(index)).cummax(dim=-1).values
    ranks = torch.empty_like(index).scatter_(-1, order, index - starts)
    return torch.where(documents > 0, ranks, torch.zeros_like(ranks)) + offset
