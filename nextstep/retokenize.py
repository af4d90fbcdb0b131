"""Give a trained model a new text tokenizer, carrying its embeddings over.

Each id of the new vocabulary starts from what the model already knows about
the same text: its embedding row (and LM-head row) is the mean of the old rows
of the old tokenizer's ids for that token's text. Special tokens keep their own
rows. A model trained on bytes thus starts a word-level vocabulary with
``embed(" circle")`` = mean of ``embed(" ")``, ``embed("c")``, ... ``embed("e")``,
and everything else it learned (layers, image head, projectors) unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from nextstep.heads.lm_head import LMHead
from nextstep.tokenizers.base import TextTokenizer
from nextstep.tokenizers.special_tokens import END_OF_TEXT, NEXTSTEP_SPECIAL_TOKENS

if TYPE_CHECKING:
    from nextstep.model import NextStep


def _special_ids(tokenizer: TextTokenizer) -> dict[int, str]:
    found = {}
    for token in (END_OF_TEXT, *NEXTSTEP_SPECIAL_TOKENS):
        try:
            found[tokenizer.special_token_id(token)] = token
        except ValueError:
            continue
    return found


def vocabulary_transfer(old: TextTokenizer, new: TextTokenizer) -> list[list[int]]:
    """For every id of ``new``, the ids of ``old`` whose rows it starts from.

    A special token maps to the same special token, a raw byte (`TextTokenizer.byte_id`)
    to the old tokenizer's id of that byte when it has one, and any other id to
    the old encoding of its bytes (`TextTokenizer.token_bytes`: byte by byte where
    they are part of a character) or else of its decoded text. An id with no
    source (a special token the old tokenizer lacks) maps to an empty list and
    keeps a fresh row.
    """
    new_specials = _special_ids(new)
    new_bytes = {byte_id: value for value in range(256) if (byte_id := new.byte_id(value)) is not None}
    sources = []
    for new_id in range(new.vocab_size):
        token = new_specials.get(new_id)
        if token is not None:
            try:
                sources.append([old.special_token_id(token)])
            except ValueError:
                sources.append([])
        elif new_id in new_bytes and old.byte_id(new_bytes[new_id]) is not None:
            sources.append([old.byte_id(new_bytes[new_id])])
        elif (spelled := new.token_bytes(new_id)) is not None:
            sources.append(_encode_bytes(old, spelled))
        else:
            sources.append(old.encode(new.decode([new_id])))
    return sources


def _encode_bytes(tokenizer: TextTokenizer, data: bytes) -> list[int]:
    """``tokenizer``'s ids for ``data``: its encoding of the text, or byte by byte where the bytes
    are not whole characters and it has an id for each byte."""
    try:
        return tokenizer.encode(data.decode("utf-8"))
    except UnicodeDecodeError:
        ids = [tokenizer.byte_id(value) for value in data]
        if all(i is not None for i in ids):
            return ids
        return tokenizer.encode(data.decode("utf-8", errors="replace"))


def _transferred_rows(old_rows: torch.Tensor, sources: list[list[int]], fresh: torch.Tensor) -> torch.Tensor:
    """(V', H): the mean of ``old_rows`` (V, H) over each id's sources; ``fresh`` rows where it has none."""
    rows = fresh.clone()
    for new_id, ids in enumerate(sources):
        if ids:
            rows[new_id] = old_rows[torch.tensor(ids, device=old_rows.device)].mean(dim=0)
    return rows


@torch.no_grad()
def replace_text_tokenizer(model: NextStep, tokenizer: TextTokenizer) -> NextStep:
    """Swap ``model``'s text tokenizer for ``tokenizer`` in place; returns the model.

    The backbone's embedding table and the LM head get ``tokenizer.vocab_size``
    rows, filled by `vocabulary_transfer`; a tied head stays tied. Saving the
    model afterwards writes the new tokenizer's config and the new sizes.

    Args:
        model: a `NextStep` with a text tokenizer.
        tokenizer: the new text tokenizer (already fitted).
    """
    old = model.require_text_tokenizer()
    if model.word_vectors is not None:
        raise ValueError("a model with word vectors keeps its text tokenizer: the vectors are stored per id "
                         "of that tokenizer; swap the tokenizer before attaching word vectors")
    if tokenizer.input_vocab_size != tokenizer.vocab_size:
        raise ValueError(f"the new tokenizer reads {tokenizer.input_vocab_size - tokenizer.vocab_size} vector "
                         "word(s) beyond its vocabulary, which need the model's word vectors; swap in the "
                         "tokenizer without them, then attach word vectors (attach_word_vectors)")
    sources = vocabulary_transfer(old, tokenizer)
    if any(max(ids, default=-1) >= model.backbone.vocab_size for ids in sources):
        raise ValueError(f"the old tokenizer produces ids beyond the backbone's {model.backbone.vocab_size} rows")
    old_embedding = model.backbone.input_embeddings().weight
    hidden = old_embedding.shape[1]
    fresh = torch.empty(len(sources), hidden, dtype=old_embedding.dtype, device=old_embedding.device)
    nn.init.normal_(fresh, std=float(old_embedding.std()))
    embedding = nn.Embedding(len(sources), hidden, device=old_embedding.device, dtype=old_embedding.dtype)
    embedding.weight.copy_(_transferred_rows(old_embedding, sources, fresh))
    tied = model.lm_head.tied
    old_head = model.lm_head.output_weight()
    model.backbone.set_input_embeddings(embedding)
    if tied:
        model.lm_head = LMHead(hidden, len(sources), tied_embedding=embedding)
    else:
        head = LMHead(hidden, len(sources)).to(device=old_head.device, dtype=old_head.dtype)
        nn.init.normal_(fresh, std=float(old_head.std()))
        head.weight.copy_(_transferred_rows(old_head, sources, fresh))
        model.lm_head = head
    model.text_tokenizer = tokenizer
    return model
