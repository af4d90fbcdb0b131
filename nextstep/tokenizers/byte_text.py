"""A byte-level text tokenizer that needs no files."""

from __future__ import annotations

from dataclasses import dataclass

from nextstep.config import Config
from nextstep.registry import register_component
from nextstep.tokenizers.base import TextTokenizer, token_id_list
from nextstep.tokenizers.special_tokens import END_OF_TEXT, NEXTSTEP_SPECIAL_TOKENS


@dataclass
class ByteTextTokenizerConfig(Config):
    """The byte tokenizer has nothing to configure."""


@register_component("text_tokenizer", "byte")
class ByteTextTokenizer(TextTokenizer):
    """UTF-8 bytes as ids 0-255, then ``<|endoftext|>`` and NextStep's special tokens.

    ``decode(encode(text)) == text`` for every string.
    """

    config_class = ByteTextTokenizerConfig
    specials: tuple[str, ...] = (END_OF_TEXT, *NEXTSTEP_SPECIAL_TOKENS)

    def __init__(self, config: ByteTextTokenizerConfig | None = None, base_dir=None):
        self.config = config or ByteTextTokenizerConfig()
        self._special_ids = {token: 256 + i for i, token in enumerate(self.specials)}
        self._special_strings = {i: token for token, i in self._special_ids.items()}

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, found {type(text).__name__}")
        return list(text.encode("utf-8", errors="surrogatepass"))  # a lone surrogate too

    def decode(self, ids: list[int]) -> str:
        """Ids (a list or another 1-D sequence of ints: a 1-D tensor or array too) -> text.

        Raises:
            TypeError: ``ids`` that are not a 1-D sequence of ints (a batch of rows, say).
            ValueError: an id outside the vocabulary.
        """
        pieces: list[str] = []
        buffer = bytearray()
        for token in token_id_list(ids):
            if 0 <= token < 256:
                buffer.append(token)
                continue
            pieces.append(_decode_bytes(buffer))
            buffer.clear()
            pieces.append(self._text_of(token))
        pieces.append(_decode_bytes(buffer))
        return "".join(pieces)

    def _text_of(self, token: int) -> str:
        """The text of an id above the bytes (a special token here)."""
        try:
            return self._special_strings[token]
        except KeyError:
            raise ValueError(
                f"id {token} is outside the {self.registry_name} tokenizer's vocabulary of "
                f"{self.input_vocab_size}"
            ) from None

    def byte_id(self, value: int) -> int:
        if not 0 <= value < 256:
            raise ValueError(f"a byte value lies in [0, 256), found {value}")
        return value

    def special_token_id(self, token: str) -> int:
        try:
            return self._special_ids[token]
        except KeyError:
            raise ValueError(f"unknown special token {token!r}; known: {list(self.specials)}") from None

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.specials)




def _decode_bytes(data: bytearray) -> str:
    """UTF-8 text of ``data``: what `ByteTextTokenizer.encode` made decodes back exactly (lone
    surrogates included); any other invalid bytes become replacement characters."""
    try:
        return data.decode("utf-8", errors="surrogatepass")
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace")
