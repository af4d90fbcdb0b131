"""HFTextTokenizer: a Hugging Face tokenizer directory read as a NextStep text tokenizer."""

import pytest

from nextstep.tokenizers import HFTextTokenizer, HFTextTokenizerConfig
from nextstep.tokenizers.hf_text import BYTE_LEVEL_ALPHABET
from nextstep.tokenizers.special_tokens import PAD


def save_tokenizer(tokenizer, directory, **special_tokens):
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special_tokens).save_pretrained(str(directory))
    return HFTextTokenizer(HFTextTokenizerConfig(path=str(directory)))


def test_the_byte_level_alphabet_spells_each_byte_with_its_own_character():
    assert sorted(BYTE_LEVEL_ALPHABET) == list(range(256))
    assert len(set(BYTE_LEVEL_ALPHABET.values())) == 256
    assert BYTE_LEVEL_ALPHABET[ord("a")] == "a" and BYTE_LEVEL_ALPHABET[ord("¬")] == "¬"
    assert BYTE_LEVEL_ALPHABET[0] == "Ā" and BYTE_LEVEL_ALPHABET[ord(" ")] == "Ġ"  # GPT-2's spelling


def test_byte_ids_outside_a_byte_are_refused(hf_tokenizer_dir):
    tokenizer = HFTextTokenizer(HFTextTokenizerConfig(path=str(hf_tokenizer_dir)))
    assert tokenizer.byte_id(ord("a")) == tokenizer.encode("a")[0]
    assert tokenizer.token_bytes(tokenizer.byte_id(0xFF)) == b"\xff"
    for value in (-1, 256):
        with pytest.raises(ValueError, match="a byte value lies in"):
            tokenizer.byte_id(value)


def test_a_byte_level_vocabulary_missing_some_bytes_has_no_byte_ids(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(["a red circle", "a blue square"] * 5,
                                  trainers.BpeTrainer(vocab_size=60, special_tokens=["<|endoftext|>"]))
    hf = save_tokenizer(tokenizer, tmp_path / "partial", eos_token="<|endoftext|>")
    assert "a" in hf.tokenizer.get_vocab() and BYTE_LEVEL_ALPHABET[0] not in hf.tokenizer.get_vocab()
    assert hf.byte_id(ord("a")) is None
    assert hf.token_bytes(hf.encode("a")[0]) is None
    assert hf.decode(hf.encode("a red circle")) == "a red circle"


def test_an_unknown_special_token_is_refused_by_a_vocabulary_with_an_unknown_token(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocabulary = {"[UNK]": 0, "a": 1, "red": 2, "circle": 3}
    tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = save_tokenizer(tokenizer, tmp_path / "words", unk_token="[UNK]")
    assert hf.special_token_id("<|begin_of_image|>") >= len(vocabulary)  # added when missing
    with pytest.raises(ValueError, match="special token '<\\|nope\\|>' is not among the tokenizer's added or special"):
        hf.special_token_id("<|nope|>")
    with pytest.raises(ValueError, match="special token 'red' is not among"):  # an ordinary token
        hf.special_token_id("red")
    with pytest.raises(TypeError, match="ids must be a list or 1-D sequence of ints, found float 1.5 among them"):
        hf.decode([1, 1.5])


def test_a_tokenizer_keeps_its_own_pad_token_and_gets_nextsteps_where_it_has_none(hf_tokenizer_dir, tmp_path):
    import json

    from transformers import AutoTokenizer

    assert HFTextTokenizer(HFTextTokenizerConfig(path=str(hf_tokenizer_dir))).tokenizer.pad_token == PAD
    source = AutoTokenizer.from_pretrained(str(hf_tokenizer_dir))
    source.pad_token = "<|endoftext|>"
    source.save_pretrained(str(tmp_path / "padded"))
    padded = HFTextTokenizer(HFTextTokenizerConfig(path=str(tmp_path / "padded")))
    assert padded.tokenizer.pad_token == "<|endoftext|>"
    padded.save(tmp_path / "model")
    assert json.loads((tmp_path / "model" / "tokenizer" / "tokenizer_config.json").read_text())["pad_token"] == \
        "<|endoftext|>"
