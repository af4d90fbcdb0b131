"""WordTextTokenizer: lossless on every string, words as single ids, bytes for the rest, fitted reproducibly."""

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from nextstep import build_model
from nextstep.config import ComponentSpec
from nextstep.tokenizers import ByteTextTokenizer, WordTextTokenizer, WordTextTokenizerConfig
from nextstep.tokenizers.special_tokens import BEGIN_OF_IMAGE, END_OF_TEXT, NEXTSTEP_SPECIAL_TOKENS
from nextstep.tokenizers.word_text import split_pieces

CAPTIONS = ["a red circle to the left of a blue square", "three red squares", "a circle and a square",
            "grinning face with smiling eyes", "flag of France", "4*4"]


def fitted(min_count=1, max_words=0, texts=CAPTIONS):
    return WordTextTokenizer(WordTextTokenizerConfig(min_count=min_count, max_words=max_words)).fit(texts)


@given(st.text())
def test_pieces_join_back_to_the_text(text):
    assert "".join(split_pieces(text)) == text


@given(st.text())
@example("a \ud800 red \udfff")  # lone surrogates, which st.text() never draws
def test_decode_inverts_encode_on_any_string(text):
    tokenizer = fitted()
    assert tokenizer.decode(tokenizer.encode(text)) == text


@given(st.lists(st.sampled_from(["red", "circle", "square", "of", "face", "Ünïcode", "x"]), min_size=1, max_size=8))
def test_known_words_take_one_id_each_and_unknown_ones_their_bytes(words):
    tokenizer = fitted()
    text = " ".join(words)
    ids = tokenizer.encode(text)
    expected = 0
    for i, word in enumerate(words):
        piece = word if i == 0 else " " + word
        expected += 1 if piece in tokenizer.words else len(piece.encode("utf-8"))
    assert len(ids) == expected


def test_a_caption_of_known_words_is_one_id_per_word():
    tokenizer = fitted()
    ids = tokenizer.encode("a red circle to the left of a blue square")
    assert len(ids) == 10 and all(i >= 256 + len(tokenizer.specials) for i in ids)
    assert tokenizer.decode(ids[1:3]) == " red circle"


def test_special_ids_are_the_byte_tokenizers():
    tokenizer, byte = fitted(), ByteTextTokenizer()
    for token in (END_OF_TEXT, *NEXTSTEP_SPECIAL_TOKENS):
        assert tokenizer.special_token_id(token) == byte.special_token_id(token)
    assert tokenizer.decode([tokenizer.special_token_id(BEGIN_OF_IMAGE)]) == BEGIN_OF_IMAGE
    assert tokenizer.encode(BEGIN_OF_IMAGE) != [tokenizer.special_token_id(BEGIN_OF_IMAGE)]


def test_fitting_keeps_frequent_pieces_most_frequent_first_and_is_reproducible():
    tokenizer = fitted(min_count=2, texts=[*CAPTIONS, "a blue square"])
    # " square" and "a" three times, then the pieces seen twice, each count in code-point order
    assert tokenizer.words == (" square", "a", " a", " blue", " circle", " of", " red", "4")
    assert fitted(min_count=2, texts=[*CAPTIONS, "a blue square"]).words == tokenizer.words
    assert fitted(min_count=2, max_words=3, texts=[*CAPTIONS, "a blue square"]).words == tokenizer.words[:3]
    assert tokenizer.fit(["something else entirely"]) is tokenizer  # a fitted vocabulary never changes


def test_unknown_ids_and_bad_configs_are_named():
    tokenizer = fitted()
    with pytest.raises(ValueError, match=f"outside the word tokenizer's vocabulary of {tokenizer.vocab_size}"):
        tokenizer.decode([tokenizer.vocab_size])
    with pytest.raises(ValueError, match="unknown special token"):
        tokenizer.special_token_id("<|nope|>")
    with pytest.raises(TypeError, match="text must be a str"):
        tokenizer.encode(b"bytes")
    for fields, message in [({"words": ("red circle",)}, "single pieces"), ({"words": ("a", "a")}, "no repeated"),
                            ({"min_count": 0}, "min_count must be an integer >= 1"),
                            ({"max_words": -1}, "max_words must be an integer >= 0"),
                            ({"words": ("",)}, "non-empty strings")]:
        with pytest.raises(ValueError, match=message):
            WordTextTokenizerConfig(**fields)


def test_a_model_with_a_word_tokenizer_saves_and_loads_its_vocabulary(tmp_path):
    from nextstep.presets import tiny
    from nextstep.retokenize import replace_text_tokenizer

    model = build_model("tiny", seed=0)
    replace_text_tokenizer(model, fitted())
    model.save_pretrained(tmp_path / "model")
    again = type(model).from_pretrained(tmp_path / "model")
    assert isinstance(again.text_tokenizer, WordTextTokenizer)
    assert again.text_tokenizer.words == model.text_tokenizer.words
    assert again.backbone.vocab_size == model.text_tokenizer.vocab_size
    spec = ComponentSpec("text_tokenizer", "word", model.text_tokenizer.config)
    with pytest.raises(ValueError, match="but the backbone's embedding table has only 266 rows"):
        build_model(tiny().replace(text_tokenizer=spec))


def test_bytes_keep_their_ids_and_other_values_are_refused():
    tokenizer = fitted()
    assert [tokenizer.byte_id(v) for v in (0, 97, 255)] == [0, 97, 255]
    assert tokenizer.encode("ñ") == [tokenizer.byte_id(b) for b in "ñ".encode()]
    with pytest.raises(ValueError, match="a byte value lies in"):
        tokenizer.byte_id(256)


@pytest.mark.parametrize("make", [ByteTextTokenizer, fitted])
def test_decoding_a_batch_of_ids_names_what_it_found(make):
    import numpy as np
    import torch

    tokenizer = make()
    assert tokenizer.decode(torch.tensor([97, 98])) == tokenizer.decode(np.array([97, 98])) == "ab"
    with pytest.raises(TypeError, match=r"ids must be a list or 1-D sequence of ints, found a tensor of shape "
                                        r"\(1, 2\)"):
        tokenizer.decode(torch.tensor([[97, 98]]))
    with pytest.raises(TypeError, match=r"ids must be a list or 1-D sequence of ints, found a list holding a list "
                                        r"\(\[97, 98\]\)"):
        tokenizer.decode([[97, 98]])
    with pytest.raises(TypeError, match="ids must be a list or 1-D sequence of ints, found float 97.0 among them"):
        tokenizer.decode([97.0])


def test_each_digit_is_a_piece_of_its_own():
    assert split_pieces("16*16 x2") == ["1", "6", "*", "1", "6", " x", "2"]
    tokenizer = fitted(texts=["1024 by 768"])
    assert "1024" not in tokenizer.words and {"1", "0", "2", "4"} <= set(tokenizer.words)


def test_fitting_by_default_keeps_the_pieces_seen_at_least_twice():
    assert WordTextTokenizer().fit(["a red circle", "a blue circle"]).words == (" circle", "a")


@given(st.lists(st.text(alphabet=" \t\nab,", max_size=12), max_size=6))
@example(["a  b", "a  b "])
def test_fitting_never_makes_whitespace_a_word(texts):
    tokenizer = fitted(texts=texts)
    assert not any(word.isspace() for word in tokenizer.words)
    assert all(tokenizer.decode(tokenizer.encode(text)) == text for text in texts)


def test_a_vector_word_may_not_be_another_case_of_a_known_word():
    with pytest.raises(ValueError, match="lacks in every form.*found 'red'"):
        WordTextTokenizerConfig(words=("a", " Red"), vector_words=("red",))


def test_an_id_past_the_vector_words_names_the_vocabulary_the_vector_words_extend():
    tokenizer = WordTextTokenizer(WordTextTokenizerConfig(words=("a", " circle"), vector_words=("violin", "cello")))
    assert tokenizer.input_vocab_size == tokenizer.vocab_size + 2
    tokenizer.decode([tokenizer.vocab_size + 1])  # a vector word decodes
    with pytest.raises(ValueError, match=f"outside the word tokenizer's vocabulary of {tokenizer.input_vocab_size}"):
        tokenizer.decode([tokenizer.input_vocab_size])
