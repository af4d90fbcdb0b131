"""Adapter over a Hugging Face tokenizer directory."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from nextstep.config import Config, require
from nextstep.registry import register_component
from nextstep.tokenizers.base import TextTokenizer, token_id_list
from nextstep.tokenizers.special_tokens import END_OF_TEXT, NEXTSTEP_SPECIAL_TOKENS, PAD


def byte_level_alphabet() -> dict[int, str]:
    """Byte value -> the character byte-level BPE vocabularies (GPT-2, Qwen) spell it with: printable
    Latin-1 bytes stand for themselves, the other bytes for the code points from 256 up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [value for value in range(256) if value not in printable]
    return {**{value: chr(value) for value in printable},
            **{value: chr(256 + index) for index, value in enumerate(others)}}


#: `byte_level_alphabet`, built once.
BYTE_LEVEL_ALPHABET = byte_level_alphabet()


@dataclass
class HFTextTokenizerConfig(Config):
    """Where `HFTextTokenizer` finds its files.

    Args:
        path: a local tokenizer directory (``tokenizer.json`` / ``tokenizer_config.json``).
            A relative path is resolved against the model directory when loading a
            saved model.
    """

    path: str = ""

    def validate(self) -> None:
        require(isinstance(self.path, str), "path", self.path, "a string")


@register_component("text_tokenizer", "huggingface")
class HFTextTokenizer(TextTokenizer):
    """Any ``transformers`` tokenizer, with NextStep's special tokens added when missing.

    Tokens already present keep their ids (so a NextStep-1 release tokenizer keeps
    ``<|begin_of_image|>`` = 151667) and are marked special, so that their text in a
    prompt stays text; missing ones are appended in the release's order.
    Loading never touches the network.
    """

    config_class = HFTextTokenizerConfig

    def __init__(self, config: HFTextTokenizerConfig, base_dir: Path | None = None):
        from transformers import AutoTokenizer

        self.config = config
        if not config.path:
            raise ValueError("HFTextTokenizerConfig.path must name a local tokenizer directory, found ''")
        path = Path(config.path)
        if not path.is_absolute() and base_dir is not None and (base_dir / path).exists():
            path = base_dir / path
        if not path.is_dir():
            raise FileNotFoundError(
                f"expected a Hugging Face tokenizer directory at {str(path)!r}, found nothing"
            )
        # Never run code shipped in the directory (a model folder's config.json may name some).
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True,
                                                       trust_remote_code=False)
        vocab = self.tokenizer.get_vocab()
        wanted = (END_OF_TEXT, *NEXTSTEP_SPECIAL_TOKENS)
        missing = [t for t in wanted if t not in vocab]
        if missing:
            self.tokenizer.add_tokens(missing, special_tokens=True)
        # Added as plain tokens, they would be read out of a prompt's text: mark them special (same ids).
        plain = [token for token in self.tokenizer.added_tokens_decoder.values()
                 if token.content in wanted and not token.special]
        if plain:
            from tokenizers import AddedToken

            self.tokenizer.add_tokens([AddedToken(token.content, special=True, normalized=False, lstrip=token.lstrip,
                                                  rstrip=token.rstrip, single_word=token.single_word)
                                       for token in plain], special_tokens=True)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = PAD

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, found {type(text).__name__}")
        return list(self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        ids = token_id_list(ids)
        size = self.vocab_size
        outside = [i for i in ids if not 0 <= i < size]
        if outside:
            raise ValueError(f"ids {outside[:5]} lie outside the tokenizer's vocabulary of {size}")
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    @cached_property
    def _byte_level(self) -> dict[str, int] | None:
        """Character -> byte of a byte-level BPE vocabulary (one token for each byte); None otherwise."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if type(getattr(backend, "decoder", None)).__name__ != "ByteLevel":
            return None
        vocab = self.tokenizer.get_vocab()
        if not all(character in vocab for character in BYTE_LEVEL_ALPHABET.values()):
            return None
        return {character: value for value, character in BYTE_LEVEL_ALPHABET.items()}

    def byte_id(self, value: int) -> int | None:
        """The id of the single-byte token of a byte-level BPE vocabulary; None for other vocabularies."""
        if self._byte_level is None:
            return None
        if not 0 <= value < 256:
            raise ValueError(f"a byte value lies in [0, 256), found {value}")
        return self.tokenizer.convert_tokens_to_ids(BYTE_LEVEL_ALPHABET[value])

    def token_bytes(self, token_id: int) -> bytes | None:
        """The bytes of an ordinary token of a byte-level BPE vocabulary (None for added tokens and
        other vocabularies)."""
        characters = self._byte_level
        if characters is None or int(token_id) in self.tokenizer.added_tokens_decoder:
            return None
        token = self.tokenizer.convert_ids_to_tokens(int(token_id))
        if not isinstance(token, str) or not all(character in characters for character in token):
            return None
        return bytes(characters[character] for character in token)

    def special_token_id(self, token: str) -> int:
        token_id = self._special_ids.get(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"special token {token!r} is not among the tokenizer's added or special tokens "
                             f"({len(self._special_ids)} of them)")
        return token_id

    @cached_property
    def _special_ids(self) -> dict[str, int]:
        """Id of each added or special token (read once: the special-token ids are asked for per example)."""
        specials = set(self.tokenizer.get_added_vocab()) | set(self.tokenizer.all_special_tokens)
        return {token: int(self.tokenizer.convert_tokens_to_ids(token)) for token in specials}

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def save(self, directory: Path) -> HFTextTokenizerConfig:
        """Write the tokenizer files into ``directory / "tokenizer"``; returns the config that finds them
        from ``directory`` (this tokenizer keeps its own)."""
        self.tokenizer.save_pretrained(str(Path(directory) / "tokenizer"))
        return self.config.replace(path="tokenizer")
