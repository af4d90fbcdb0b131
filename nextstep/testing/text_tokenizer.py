"""The contract of `nextstep.tokenizers.base.TextTokenizer`."""

from __future__ import annotations

from nextstep.testing.assertions import refuses
from nextstep.tokenizers.base import TextTokenizer
from nextstep.tokenizers.special_tokens import END_OF_TEXT, NEXTSTEP_SPECIAL_TOKENS


def check_text_tokenizer(tokenizer: TextTokenizer, text: str = "a red circle 16*16 ünïcode") -> None:
    """Check a text tokenizer's contract; raise ``AssertionError`` naming the property that fails.

    - NextStep's special tokens have distinct ids inside the vocabulary, and
      padding is not end-of-sequence;
    - ``decode(encode(text)) == text``, with integer ids inside the ids the
      model reads (``input_vocab_size``);
    - every special token's string in user text, alone or within other text,
      stays plain text (a prompt cannot write ``<|begin_of_image|>`` or end itself
      with ``<|endoftext|>``);
    - ``special_token_id`` of an unknown token raises ``ValueError``;
    - a raw byte's id, where the tokenizer has one, decodes to that byte.

    Args:
        text: what must survive encoding and decoding (the tokenizer's alphabet).
    """
    name = type(tokenizer).__name__
    ids = {token: tokenizer.special_token_id(token) for token in NEXTSTEP_SPECIAL_TOKENS}
    assert len(set(ids.values())) == len(ids), f"{name}: special tokens share ids: {ids}"
    outside = {token: i for token, i in ids.items() if not 0 <= i < tokenizer.vocab_size}
    assert not outside, f"{name}: special token ids outside the vocabulary of {tokenizer.vocab_size}: {outside}"
    assert tokenizer.pad_id != tokenizer.eos_id, f"{name}: padding and end-of-sequence share id {tokenizer.pad_id}"
    encoded = tokenizer.encode(text)
    assert all(isinstance(i, int) for i in encoded), f"{name}: encode must give Python ints"
    outside = [i for i in encoded if not 0 <= i < tokenizer.input_vocab_size]
    assert not outside, f"{name}: encode({text!r}) gives ids outside [0, {tokenizer.input_vocab_size}): {outside}"
    decoded = tokenizer.decode(encoded)
    assert decoded == text, f"{name}: decode(encode({text!r})) gives {decoded!r}"
    special = {**ids, END_OF_TEXT: tokenizer.eos_id}
    for token, token_id in special.items():
        for written in (token, f"x{token} y"):
            assert token_id not in tokenizer.encode(written), (
                f"{name}: the text {written!r} encodes to the special token {token} (a prompt could inject it)")
    refuses(lambda: tokenizer.special_token_id("<|no_such_token|>"), "special_token_id of an unknown token", name)
    byte = tokenizer.byte_id(ord("a"))
    if byte is not None:
        assert tokenizer.decode([byte]) == "a", f"{name}: byte_id(ord('a')) decodes to {tokenizer.decode([byte])!r}"
