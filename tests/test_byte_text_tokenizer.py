"""ByteTextTokenizer: UTF-8 bytes as ids, NextStep's special tokens after them."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nextstep.tokenizers import ByteTextTokenizer
from nextstep.tokenizers.special_tokens import END_OF_TEXT, NEXTSTEP_SPECIAL_TOKENS


@given(st.text())
def test_encoding_gives_the_utf8_bytes(text):
    assert ByteTextTokenizer().encode(text) == list(text.encode("utf-8"))


def test_special_tokens_follow_the_bytes_in_order_and_fill_the_vocabulary():
    tokenizer = ByteTextTokenizer()
    specials = (END_OF_TEXT, *NEXTSTEP_SPECIAL_TOKENS)
    assert [tokenizer.special_token_id(token) for token in specials] == list(range(256, 256 + len(specials)))
    assert tokenizer.vocab_size == 256 + len(specials)
    assert tokenizer.decode([104, tokenizer.eos_id, 105]) == f"h{END_OF_TEXT}i"


def test_decoding_something_other_than_a_sequence_of_ids_names_it():
    tokenizer = ByteTextTokenizer()
    with pytest.raises(TypeError, match=r"ids must be a list or 1-D sequence of ints, found a tensor of shape \(\)"):
        tokenizer.decode(torch.tensor(97))
    with pytest.raises(TypeError, match="ids must be a list or 1-D sequence of ints, found bytes b'ab'"):
        tokenizer.decode(b"ab")
    with pytest.raises(TypeError, match="ids must be a list or 1-D sequence of ints, found str 'ab'"):
        tokenizer.decode("ab")
    with pytest.raises(TypeError, match="ids must be a list or 1-D sequence of ints, found int 97"):
        tokenizer.decode(97)
    assert tokenizer.decode((97, 98)) == tokenizer.decode(iter([97, 98])) == "ab"
