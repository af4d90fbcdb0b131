"""A word-level text tokenizer with a byte fallback, fitted to a caption corpus."""

from __future__ import annotations

import collections
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from nextstep.config import OMITTED_WHEN_DEFAULT, Config, require
from nextstep.registry import register_component
from nextstep.tokenizers.byte_text import ByteTextTokenizer

#: How text is cut into pieces: a word (letters) or one digit or a run of
#: punctuation, each with the space before it; whitespace runs keep their last
#: space for the piece that follows. Every character of every string falls in
#: exactly one piece, so joining the pieces gives the text back.
PIECE_PATTERN = re.compile(r" ?[^\W\d_]+| ?\d| ?[^\s\w]+| ?_+|\s+(?!\S)|\s+")


def _bare_lower(piece: str) -> str:
    """A piece without its leading space, in lower case: how aliases and vector words are keyed."""
    return (piece[1:] if piece.startswith(" ") else piece).lower()


def split_pieces(text: str) -> list[str]:
    """``text`` cut into the pieces the vocabulary is made of (``"".join`` gives ``text`` back)."""
    return PIECE_PATTERN.findall(text)


@dataclass
class WordTextTokenizerConfig(Config):
    """The vocabulary of `WordTextTokenizer`.

    Args:
        words: the pieces with their own id, in id order (``" circle"`` with its
            leading space and ``"circle"`` without are different pieces). Empty
            until the tokenizer is fitted (`WordTextTokenizer.fit`).
        min_count: fitting keeps pieces seen at least this often.
        max_words: fitting keeps at most this many pieces, the most frequent
            first (0: no limit).
        aliases: words outside the vocabulary read as words inside it: a
            lower-case word (letters only) -> a word of ``words`` without its
            leading space, e.g. ``{"violin": "guitar"}``. A piece of letters
            that is not in ``words`` is looked up in lower case and, when
            found, encodes as its alias: with the piece's own leading space
            where the vocabulary has that form, else the other form (a space
            byte first, for a spaced piece whose alias the vocabulary has only
            without one). Empty: unknown words become bytes.
            `nextstep.tokenizers.word_aliases` builds aliases from a
            pretrained text encoder.
        vector_words: lower-case words of letters outside the vocabulary that get
            ids of their own after the vocabulary's (``vocab_size + i`` for
            ``vector_words[i]``), for a model that reads them through pretrained
            word vectors (`nextstep.layers.word_vectors`). Such ids have no row in
            the backbone's embedding table: `input_vocab_size` counts them,
            `vocab_size` does not. A piece of letters that is not in ``words``
            is looked up here (in lower case, leading space removed) before the
            aliases; its id decodes as the word with a leading space.
    """

    words: tuple[str, ...] = ()
    min_count: int = 2
    max_words: int = 0
    aliases: dict[str, str] = field(default_factory=dict, metadata=OMITTED_WHEN_DEFAULT)
    vector_words: tuple[str, ...] = field(default=(), metadata=OMITTED_WHEN_DEFAULT)

    def validate(self) -> None:
        require(isinstance(self.min_count, int) and self.min_count >= 1, "min_count", self.min_count,
                "an integer >= 1")
        require(isinstance(self.max_words, int) and self.max_words >= 0, "max_words", self.max_words,
                "an integer >= 0 (0: no limit)")
        require(all(isinstance(w, str) and w for w in self.words), "words", self.words,
                "non-empty strings")
        for word in self.words:
            require(split_pieces(word) == [word], "words", word,
                    "single pieces of PIECE_PATTERN (one word, digit or punctuation run, "
                    "with at most one leading space)")
        require(len(set(self.words)) == len(self.words), "words", self.words, "no repeated piece")
        require(isinstance(self.aliases, dict), "aliases", self.aliases, "a mapping word -> vocabulary word")
        known = {word.lstrip(" ") for word in self.words}
        for word, target in self.aliases.items():
            require(isinstance(word, str) and word.isalpha() and word == word.lower(), "aliases", word,
                    "keyed by lower-case words of letters only")
            require(target in known, f"aliases[{word!r}]", target,
                    "a word of the vocabulary (with or without its leading space)")
        known_lower = {word.lower() for word in known}
        for word in self.vector_words:
            require(isinstance(word, str) and word.isalpha() and word == word.lower(), "vector_words", word,
                    "lower-case words of letters only")
            require(word not in known_lower, "vector_words", word,
                    "words the vocabulary lacks in every form (a known word's other forms read as aliases)")
        require(len(set(self.vector_words)) == len(self.vector_words), "vector_words", self.vector_words,
                "no repeated word")


@register_component("text_tokenizer", "word")
class WordTextTokenizer(ByteTextTokenizer):
    """Whole words as single ids, anything else as UTF-8 bytes.

    Ids: those of `ByteTextTokenizer` (bytes ``0-255``, then ``<|endoftext|>``
    and NextStep's special tokens), then ``words``. A piece of text
    (see `split_pieces`) in the vocabulary becomes its id, any other piece its
    bytes, so every string encodes and ``decode(encode(text)) == text``.

    A byte-level model spends its first layers assembling words; with words as
    tokens a small backbone reads "a red circle and a blue square" as seven
    positions instead of 30.

    With ``aliases`` (see `WordTextTokenizerConfig`) a word the vocabulary lacks
    encodes as a related word it has ("violin" as " guitar"), so a model trained
    on a few hundred words can still read a prompt of everyday English; such a
    text decodes to its aliases, not to itself. With ``vector_words`` such a
    word gets an id of its own beyond `vocab_size`, which a model reads through
    a pretrained word vector (`nextstep.layers.word_vectors`).
    """

    config_class = WordTextTokenizerConfig

    def __init__(self, config: WordTextTokenizerConfig | None = None, base_dir=None):
        super().__init__()
        self.config = config or WordTextTokenizerConfig()
        self._first_word_id = 256 + len(self.specials)
        self._word_ids = {word: self._first_word_id + i for i, word in enumerate(self.config.words)}
        self._alias_ids = {word: self._alias_id(target) for word, target in self.config.aliases.items()}
        first_vector_id = self._first_word_id + len(self.config.words)
        self._vector_ids = {word: first_vector_id + i for i, word in enumerate(self.config.vector_words)}

    def _alias_id(self, target: str) -> tuple[list[int], list[int]]:
        """The ids of ``target`` read without and with a leading space: the word's own id where the
        vocabulary has that form, else the other form (after a space byte for a spaced piece)."""
        bare, spaced = self._word_ids.get(target), self._word_ids.get(" " + target)
        return ([bare if bare is not None else spaced],
                [spaced] if spaced is not None else [self.byte_id(ord(" ")), bare])

    # ------------------------------------------------------------ fitting
    @classmethod
    def count_pieces(cls, texts: Iterable[str]) -> collections.Counter:
        """How often each non-whitespace piece occurs in ``texts``."""
        counts: collections.Counter = collections.Counter()
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"texts must be strings, found {type(text).__name__}")
            counts.update(piece for piece in split_pieces(text) if not piece.isspace())
        return counts

    def fit(self, texts: Iterable[str]) -> "WordTextTokenizer":
        """A tokenizer whose words are the pieces of ``texts`` seen at least ``min_count`` times,
        most frequent first (ties in code-point order), at most ``max_words`` of them.

        A tokenizer that already has words returns itself: a saved vocabulary never changes.
        """
        if self.config.words:
            return self
        counts = self.count_pieces(texts)
        kept = sorted((piece for piece, n in counts.items() if n >= self.config.min_count),
                      key=lambda piece: (-counts[piece], piece))
        if self.config.max_words:
            kept = kept[: self.config.max_words]
        return type(self)(self.config.replace(words=tuple(kept)))

    # ------------------------------------------------------------ interface
    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, found {type(text).__name__}")
        ids: list[int] = []
        for piece in split_pieces(text):
            word_id = self._word_ids.get(piece)
            if word_id is not None:
                ids.append(word_id)
            elif self._vector_ids and (vector_id := self._vector_id(piece)) is not None:
                ids.append(vector_id)
            elif self._alias_ids and (alias := self._aliased(piece)) is not None:
                ids.extend(alias)
            else:
                ids.extend(super().encode(piece))  # its bytes, as the byte tokenizer spells them
        return ids

    def _aliased(self, piece: str) -> list[int] | None:
        ids = self._alias_ids.get(_bare_lower(piece))
        return None if ids is None else ids[piece.startswith(" ")]

    def _vector_id(self, piece: str) -> int | None:
        return self._vector_ids.get(_bare_lower(piece))

    def _text_of(self, token: int) -> str:
        if self._first_word_id <= token < self.vocab_size:
            return self.config.words[token - self._first_word_id]
        if self.vocab_size <= token < self.input_vocab_size:
            return " " + self.config.vector_words[token - self.vocab_size]
        return super()._text_of(token)

    @property
    def vocab_size(self) -> int:
        """Ids with a row in the embedding table (and a logit): bytes, specials, ``words``."""
        return self._first_word_id + len(self.config.words)

    @property
    def input_vocab_size(self) -> int:
        """Every id `encode` can return: `vocab_size` plus one per vector word."""
        return self.vocab_size + len(self.config.vector_words)

    @property
    def words(self) -> tuple[str, ...]:
        return self.config.words

    def with_aliases(self, aliases: dict[str, str]) -> "WordTextTokenizer":
        """The same vocabulary with ``aliases`` (see `WordTextTokenizerConfig`) in place of its own."""
        return type(self)(self.config.replace(aliases=dict(aliases)))

    def with_vector_words(self, words: Iterable[str]) -> "WordTextTokenizer":
        """The same vocabulary and aliases with ``words`` as its `vector_words`."""
        return type(self)(self.config.replace(vector_words=tuple(words)))
