"""Pretrained word vectors as a second input embedding for text ids.

A model trained on a few hundred caption words knows nothing else of the
language. `WordVectorInput` gives every word id (the vocabulary's words and the
word tokenizer's ``vector_words``) a fixed vector from a pretrained text
encoder, stored compressed (``dim`` components, int8 with one scale per row),
and adds a trained projection of it to the token's embedding::

    embedding(id) = E[learned_id(id)] + P @ v(id)        E: the backbone's table (V, H)

``learned_id`` is the id itself for ids inside the table and, for a vector word
(an id >= V), the vocabulary word it is closest to: an unknown word starts out
as its nearest known word, and its vector tells the model how it differs.
``P`` starts at zero, so attaching vectors to a trained model changes nothing
until it is trained further.

Training teaches the model to read the vectors the way an unknown word needs:
with ``substitution_probability`` p, each known word's learned id is swapped for
its nearest *other* known word (judged by the stored vectors) while its own
vector stays, which is exactly how an unknown word arrives at test time.
`nextstep.tokenizers.word_vector_table` computes the vectors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nextstep.config import Config, require
from nextstep.dtypes import is_integer_dtype


@dataclass
class WordVectorConfig(Config):
    """The word vectors of a model (``count == 0``: none).

    Args:
        count: rows, one per id the text tokenizer can produce (its `input_vocab_size`).
        dim: components per vector.
        substitution_probability: in training, the chance that a known word's
            learned id is replaced by its nearest other known word.
    """

    count: int = 0
    dim: int = 64
    substitution_probability: float = 0.0

    def validate(self) -> None:
        require(isinstance(self.count, int) and self.count >= 0, "count", self.count, "an integer >= 0")
        require(isinstance(self.dim, int) and self.dim >= 1, "dim", self.dim, "an integer >= 1")
        require(0 <= self.substitution_probability <= 1, "substitution_probability",
                self.substitution_probability, "in [0, 1]")


class WordVectorInput(nn.Module):
    """Fixed word vectors, projected and added to the text embeddings of a model.

    Args:
        config: rows, components, training substitution.
        table_size: V, the rows of the backbone's embedding table.
        hidden_size: H.

    Buffers (saved with the model): ``codes`` (count, dim) int8 and ``scales``
    (count,): the vectors, row i being ``codes[i] * scales[i]`` (all zero for ids
    that are not words); ``learned_ids`` (count,) int32, each id's row of the
    embedding table.
    """

    def __init__(self, config: WordVectorConfig, table_size: int, hidden_size: int):
        super().__init__()
        if config.count < table_size:
            raise ValueError(f"word vectors need a row per id: expected count >= the embedding table's "
                             f"{table_size} rows, found {config.count}")
        self.config = config
        self.table_size = table_size
        self.register_buffer("codes", torch.zeros(config.count, config.dim, dtype=torch.int8))
        self.register_buffer("scales", torch.zeros(config.count))
        self.register_buffer("learned_ids", torch.arange(config.count, dtype=torch.int32).clamp_max(table_size - 1))
        self.projection = nn.Linear(config.dim, hidden_size, bias=False)
        nn.init.zeros_(self.projection.weight)
        self._substitutes: torch.Tensor | None = None

    @torch.no_grad()
    def set_vectors(self, vectors: torch.Tensor, learned_ids: torch.Tensor) -> None:
        """Store ``vectors`` (count, dim) (zero rows: no vector) and ``learned_ids`` (count,).

        Raises:
            ValueError: a shape differs from (count, dim) / (count,), a vector is not finite,
                a learned id is not an integer, lies outside the table or differs from its own
                id inside it.
        """
        count, dim = self.codes.shape
        if tuple(vectors.shape) != (count, dim):
            raise ValueError(f"expected vectors of shape {(count, dim)}, found {tuple(vectors.shape)}")
        if tuple(learned_ids.shape) != (count,):
            raise ValueError(f"expected learned_ids of shape {(count,)}, found {tuple(learned_ids.shape)}")
        if not is_integer_dtype(learned_ids.dtype):
            raise ValueError(f"learned_ids must be integers, found {learned_ids.dtype}")
        bad_rows = (~torch.isfinite(vectors)).any(dim=1).nonzero().flatten()
        if bad_rows.numel():
            raise ValueError(f"vectors must be finite, found NaN or infinite values in row(s) {bad_rows[:5].tolist()}")
        learned_ids = learned_ids.long().cpu()
        if learned_ids.min() < 0 or learned_ids.max() >= self.table_size:
            raise ValueError(f"learned_ids must lie in [0, {self.table_size}), found "
                             f"[{int(learned_ids.min())}, {int(learned_ids.max())}]")
        inside = torch.arange(self.table_size)
        if not torch.equal(learned_ids[: self.table_size], inside):
            raise ValueError("learned_ids must map every id of the embedding table to itself")
        vectors = vectors.detach().float().cpu()
        scales = vectors.abs().amax(dim=1) / 127
        codes = torch.where(scales[:, None] > 0, vectors / scales.clamp_min(1e-30)[:, None], 0.0)
        self.codes.copy_(codes.round().clamp(-127, 127).to(torch.int8))
        self.scales.copy_(scales)
        self.learned_ids.copy_(learned_ids.to(torch.int32))
        self._substitutes = None

    def vectors(self, ids: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The stored vectors of ``ids`` (..., dim), or all of them (count, dim)."""
        codes, scales = (self.codes, self.scales) if ids is None else (self.codes[ids], self.scales[ids])
        dtype = dtype or self.projection.weight.dtype
        return codes.to(dtype) * scales.to(dtype)[..., None]

    def substitutes(self) -> torch.Tensor:
        """(V,) int64: each table id's nearest id with a vector for another word (cosine of the
        stored vectors; forms of one word, such as "red" and " red", share a vector and are
        skipped); ids without a vector, and a lone word, map to themselves. Computed once per
        set of vectors, ``chunk`` rows at a time (memory: chunk x V)."""
        if self._substitutes is None or self._substitutes.device != self.codes.device:
            self._substitutes = self._nearest_other_words()
        return self._substitutes

    def _nearest_other_words(self, chunk: int = 1024) -> torch.Tensor:
        rows = torch.arange(self.table_size, device=self.codes.device)
        vectors = nn.functional.normalize(self.vectors(rows, dtype=torch.float32), dim=1)
        has_vector = self.scales[: self.table_size] > 0
        nearest = rows.clone()
        for start in range(0, self.table_size, chunk):
            similarity = vectors[start:start + chunk] @ vectors.T  # (chunk, V)
            same_word = similarity >= 1 - 1e-5  # one word's forms share a vector
            similarity = similarity.masked_fill(same_word | ~has_vector[None], -2.0)
            best, index = similarity.max(dim=1)
            usable = has_vector[start:start + chunk] & (best > -2.0)
            nearest[start:start + chunk] = torch.where(usable, index, rows[start:start + chunk])
        return nearest

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._substitutes = None
        super()._load_from_state_dict(*args, **kwargs)

    def table_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (...) in [0, count) -> their rows of the embedding table (...) int64."""
        return self.learned_ids[ids].long()

    def forward(self, ids: torch.Tensor, substitute: bool = False, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, L) -> (table ids (B, L), added embeddings (B, L, H)).

        With ``substitute`` (the training loss sets it) the table ids of known
        words are swapped for their nearest other word at the rate
        ``substitution_probability``, drawn from ``generator``.
        """
        count = self.codes.shape[0]
        if ids.numel():
            low, high = (int(v) for v in torch.aminmax(ids))  # one pass, one device sync
            if low < 0 or high >= count:
                raise ValueError(f"text ids must lie in [0, {count}), found [{low}, {high}]")
        table = self.table_ids(ids)
        probability = self.config.substitution_probability
        if substitute and probability > 0:
            draws = torch.rand(ids.shape, generator=generator, device=ids.device)
            swap = (draws < probability) & (ids < self.table_size)
            table = torch.where(swap, self.substitutes()[table], table)
        return table, self.projection(self.vectors(ids))
