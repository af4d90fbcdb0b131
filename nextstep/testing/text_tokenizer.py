"""The contract of `nextstep.tokenizers.base.TextTokenizer`."""

from __future__ import annotations

import string

from nextstep.testing.assertions import refuses
from nextstep.tokenizers.base import TextTokenizer
from nextstep.tokenizers.special_tokens import (
    BEGIN_OF_IMAGE,
    END_OF_IMAGE,
    END_OF_TEXT,
    IMAGE_AREA,
    IMAGE_PLACEHOLDER,
    NEXTSTEP_SPECIAL_TOKENS,
    PAD,
)

#: The special tokens every text tokenizer gives ids to: those the sequence format and generation use.
REQUIRED_SPECIAL_TOKENS = (END_OF_TEXT, PAD, IMAGE_AREA, BEGIN_OF_IMAGE, END_OF_IMAGE, IMAGE_PLACEHOLDER)
#: Ordinary text that must never encode to a special id: printable ASCII, accents, other scripts, an emoji.
PLAIN_TEXT = string.printable + "ünïcødé ß ñ € 中文 日本語 한국어 Ελληνικά кириллица 🙂"


def check_text_tokenizer(tokenizer: TextTokenizer, text: str = "a red circle 16*16 ünïcode") -> None:
    """Check a text tokenizer's contract; raise ``AssertionError`` naming the property that fails.

    - the special tokens of `REQUIRED_SPECIAL_TOKENS` (end-of-text among them) have
      ids, and every special token with an id (the thinking and prompt-refinement
      tokens are optional) has its own, inside the vocabulary; ``decode`` renders
      each as its string;
    - ``decode(encode(text)) == text``, with integer ids inside the ids the
      model reads (``input_vocab_size``);
    - every special token's string in user text, alone or within other text,
      stays plain text (a prompt cannot write ``<|begin_of_image|>`` or end itself
      with ``<|endoftext|>``), and no ordinary character (`PLAIN_TEXT`, ``text``)
      encodes to a special id;
    - the empty text (the unconditional prompt of guidance) encodes to a list
      that decodes to the empty text;
    - ``special_token_id`` of an unknown token raises ``ValueError``;
    - a raw byte's id, where the tokenizer has one, decodes to that byte.

    Args:
        text: what must survive encoding and decoding (the tokenizer's alphabet).
    """
    name = type(tokenizer).__name__
    ids = {}
    for token in (END_OF_TEXT, *NEXTSTEP_SPECIAL_TOKENS):
        try:
            ids[token] = tokenizer.special_token_id(token)
        except ValueError as error:
            assert token not in REQUIRED_SPECIAL_TOKENS, (
                f"{name}: special_token_id({token!r}) must give an id (the sequence format uses it), raised "
                f"ValueError: {error}")
    shared = {i for i in ids.values() if list(ids.values()).count(i) > 1}
    assert not shared, f"{name}: special tokens share ids: {({t: i for t, i in ids.items() if i in shared})}"
    outside = {token: i for token, i in ids.items() if not (isinstance(i, int) and 0 <= i < tokenizer.vocab_size)}
    assert not outside, f"{name}: special token ids outside the vocabulary of {tokenizer.vocab_size}: {outside}"
    assert tokenizer.eos_id == ids[END_OF_TEXT] and tokenizer.pad_id == ids[PAD], (
        f"{name}: eos_id and pad_id must be the ids of {END_OF_TEXT} and {PAD}, found {tokenizer.eos_id} and "
        f"{tokenizer.pad_id} against {ids[END_OF_TEXT]} and {ids[PAD]}")
    for token, token_id in ids.items():
        rendered = tokenizer.decode([token_id])
        assert rendered == token, f"{name}: decode([{token_id}]) must render the special token {token}, found " \
                                  f"{rendered!r}"
    encoded = tokenizer.encode(text)
    assert all(isinstance(i, int) for i in encoded), f"{name}: encode must give Python ints"
    outside = [i for i in encoded if not 0 <= i < tokenizer.input_vocab_size]
    assert not outside, f"{name}: encode({text!r}) gives ids outside [0, {tokenizer.input_vocab_size}): {outside}"
    decoded = tokenizer.decode(encoded)
    assert decoded == text, f"{name}: decode(encode({text!r})) gives {decoded!r}"
    for token, token_id in ids.items():
        for written in (token, f"x{token} y"):
            assert token_id not in tokenizer.encode(written), (
                f"{name}: the text {written!r} encodes to the special token {token} (a prompt could inject it)")
    special_ids = {i: token for token, i in ids.items()}
    for character in dict.fromkeys(PLAIN_TEXT + text):
        hit = [special_ids[i] for i in tokenizer.encode(character) if i in special_ids]
        assert not hit, f"{name}: the character {character!r} encodes to the special token {hit[0]}"
    try:
        empty = tokenizer.encode("")
    except Exception as error:
        raise AssertionError(f"{name}: encode('') must give a list (guidance encodes the empty prompt), raised "
                             f"{type(error).__name__}: {error}") from error
    assert isinstance(empty, list) and tokenizer.decode(empty) == "", (
        f"{name}: encode('') must give a list that decodes to '' (guidance encodes the empty prompt), found {empty!r}")
    refuses(lambda: tokenizer.special_token_id("<|no_such_token|>"), "special_token_id of an unknown token", name)
    byte = tokenizer.byte_id(ord("a"))
    if byte is not None:
        assert tokenizer.decode([byte]) == "a", f"{name}: byte_id(ord('a')) decodes to {tokenizer.decode([byte])!r}"
