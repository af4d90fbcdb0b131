"""Pretrained word vectors: further words with ids of their own, read through stored vectors."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_word_aliases import ALIASES, WORDS, letter_counts

from nextstep import build_model
from nextstep.cli import main
from nextstep.layers.word_vectors import WordVectorConfig, WordVectorInput
from nextstep.model import NextStep
from nextstep.retokenize import replace_text_tokenizer
from nextstep.tokenizers import WordTextTokenizer, WordTextTokenizerConfig
from nextstep.tokenizers.word_vector_table import attach_word_vectors, principal_components

FURTHER = ("crimson", "ring", "violin", "circles")


def with_vectors(aliases=None) -> WordTextTokenizer:
    return WordTextTokenizer(WordTextTokenizerConfig(words=WORDS, aliases=aliases or {}, vector_words=FURTHER))


# ----------------------------------------------------------------- tokenizer
def test_further_words_get_ids_after_the_vocabulary_and_decode_with_a_space():
    tokenizer = with_vectors(ALIASES)
    plain = WordTextTokenizer(WordTextTokenizerConfig(words=WORDS))
    assert tokenizer.vocab_size == plain.vocab_size
    assert tokenizer.input_vocab_size == plain.vocab_size + len(FURTHER)
    first = plain.vocab_size
    assert tokenizer.encode("a crimson ring") == [tokenizer.encode("a")[0], first, first + 1]
    assert tokenizer.encode("Violin") == tokenizer.encode(" violin") == [first + 2]
    assert tokenizer.decode(tokenizer.encode("Violin, golden heart")) == " violin, yellow heart"  # alias kept
    assert tokenizer.encode("a red circle") == plain.encode("a red circle")
    assert tokenizer.encode("a cello") == plain.encode("a cello")  # neither word nor vector word: bytes


@given(st.lists(st.sampled_from(["a", " a", " red", " circle", "yellow", " heart", ",", " 3", "é", "  ", " face"]),
                max_size=12))
def test_texts_of_known_words_encode_as_without_vector_words(parts):
    text = "".join(parts)
    plain = WordTextTokenizer(WordTextTokenizerConfig(words=WORDS))
    assert with_vectors().encode(text) == plain.encode(text)


def test_bad_vector_words_are_named():
    with pytest.raises(ValueError, match="lower-case words of letters only, found 'Violin'"):
        WordTextTokenizerConfig(words=WORDS, vector_words=("Violin",))
    with pytest.raises(ValueError, match="lacks in every form.*found 'red'"):
        WordTextTokenizerConfig(words=WORDS, vector_words=("red",))
    with pytest.raises(ValueError, match="no repeated word"):
        WordTextTokenizerConfig(words=WORDS, vector_words=("ring", "ring"))


def test_without_vector_words_the_config_is_written_as_before():
    assert "vector_words" not in WordTextTokenizerConfig(words=WORDS).to_dict()


# ------------------------------------------------------------------- module
@settings(deadline=None, max_examples=30)
@given(st.integers(1, 12), st.integers(1, 8), st.integers(0, 2**31 - 1))
def test_stored_vectors_round_trip_within_half_a_step_of_int8(rows, dim, seed):
    vectors = torch.randn(rows + 3, dim, generator=torch.Generator().manual_seed(seed)) * 5
    vectors[0] = 0
    module = WordVectorInput(WordVectorConfig(count=rows + 3, dim=dim), table_size=3, hidden_size=4)
    module.set_vectors(vectors, torch.arange(rows + 3).clamp_max(2))
    step = vectors.abs().amax(dim=1, keepdim=True) / 127
    assert ((module.vectors(dtype=torch.float32) - vectors).abs() <= step / 2 + 1e-6).all()
    assert module.codes.dtype == torch.int8 and module.learned_ids.dtype == torch.int32
    assert torch.equal(module.vectors(dtype=torch.float32)[0], torch.zeros(dim))


def test_bad_vectors_or_table_rows_are_named():
    module = WordVectorInput(WordVectorConfig(count=5, dim=2), table_size=3, hidden_size=4)
    with pytest.raises(ValueError, match=r"expected vectors of shape \(5, 2\), found \(5, 3\)"):
        module.set_vectors(torch.zeros(5, 3), torch.zeros(5))
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\), found \[0, 3\]"):
        module.set_vectors(torch.zeros(5, 2), torch.tensor([0, 1, 2, 3, 0]))
    with pytest.raises(ValueError, match="map every id of the embedding table to itself"):
        module.set_vectors(torch.zeros(5, 2), torch.tensor([0, 2, 2, 1, 0]))
    with pytest.raises(ValueError, match="learned_ids must be integers, found torch.float32"):
        module.set_vectors(torch.zeros(5, 2), torch.tensor([0.0, 1.0, 2.0, 1.7, 0.0]))
    for value in (float("nan"), float("inf")):
        vectors = torch.zeros(5, 2)
        vectors[3, 1] = value
        with pytest.raises(ValueError, match=r"vectors must be finite, found NaN or infinite values in row\(s\) \[3\]"):
            module.set_vectors(vectors, torch.tensor([0, 1, 2, 1, 0]))
    with pytest.raises(ValueError, match=r"text ids must lie in \[0, 5\), found \[0, 7\]"):
        module(torch.tensor([[0, 7]]))
    with pytest.raises(ValueError, match="expected count >= the embedding table's 3 rows, found 2"):
        WordVectorInput(WordVectorConfig(count=2, dim=2), table_size=3, hidden_size=4)


@settings(deadline=None, max_examples=30)
@given(st.lists(st.tuples(st.integers(-3, 3), st.integers(-3, 3)), min_size=2, max_size=10))
def test_substitutes_are_the_nearest_other_word_by_brute_force(points):
    vectors = torch.tensor(points, dtype=torch.float32)
    count = len(points)
    module = WordVectorInput(WordVectorConfig(count=count, dim=2), table_size=count, hidden_size=4)
    module.set_vectors(vectors, torch.arange(count))
    stored = module.vectors(dtype=torch.float32)
    substitutes = module.substitutes()
    assert torch.equal(module._nearest_other_words(chunk=3), substitutes)  # chunking changes nothing
    for i in range(count):
        has = [j for j in range(count) if stored[j].abs().sum() > 0]
        others = [j for j in has if not torch.equal(module.codes[j], module.codes[i])]
        if i not in has or not others:
            assert substitutes[i] == i
            continue
        cosine = torch.nn.functional.cosine_similarity(stored[i][None], stored[others])
        assert substitutes[i] in others
        chosen = torch.nn.functional.cosine_similarity(stored[i][None], stored[int(substitutes[i])][None])
        assert chosen >= cosine.max() - 1e-6


def test_substitution_swaps_known_words_only_and_only_when_asked():
    module = WordVectorInput(WordVectorConfig(count=6, dim=2, substitution_probability=1.0), table_size=4,
                             hidden_size=3)
    module.set_vectors(torch.tensor([[0.0, 0], [1, 0], [0.9, 0.1], [0, 1], [0.1, 1], [1, 0.1]]),
                       torch.tensor([0, 1, 2, 3, 3, 1]))
    ids = torch.tensor([[0, 1, 2, 3, 4, 5]])
    table, added = module(ids)
    assert table.tolist() == [[0, 1, 2, 3, 3, 1]] and torch.equal(added, torch.zeros(1, 6, 3))
    swapped, _ = module(ids, substitute=True)
    assert swapped.tolist() == [[0, 2, 1, 2, 3, 1]]  # further words keep their row
    module.config = module.config.replace(substitution_probability=0.0)
    assert torch.equal(module(ids, substitute=True)[0], table)
    # the substitutes follow the stored vectors: new vectors, or loaded ones, replace them
    swapped_vectors = torch.tensor([[0.0, 0], [1, 0], [0, 1], [0.9, 0.1], [0.1, 1], [1, 0.1]])
    module.set_vectors(swapped_vectors, torch.tensor([0, 1, 2, 3, 3, 1]))
    assert module.substitutes().tolist() == [0, 3, 3, 1]
    fresh = WordVectorInput(module.config, table_size=4, hidden_size=3)
    fresh.substitutes()
    fresh.load_state_dict(module.state_dict())
    assert fresh.substitutes().tolist() == [0, 3, 3, 1]


# -------------------------------------------------------------------- model
def word_model(tmp_path=None) -> NextStep:
    model = build_model("tiny", seed=0)
    replace_text_tokenizer(model, WordTextTokenizer(WordTextTokenizerConfig(words=WORDS, aliases={"ring": "circle"})))
    return model.eval()


def test_principal_components_are_ordered_deterministic_and_keep_the_top_variance():
    data = torch.randn(200, 5, generator=torch.Generator().manual_seed(0)) * torch.tensor([5.0, 3, 1, 0.5, 0.1])
    components = principal_components(data, 3)
    variances = components.var(dim=0)
    assert (variances[:-1] >= variances[1:]).all()
    assert torch.allclose(variances.sum(), data.var(dim=0)[:3].sum(), rtol=0.1)
    assert torch.equal(components, principal_components(data, 3))
    with pytest.raises(ValueError, match="1 <= dim <= D"):
        principal_components(data, 6)


def test_attaching_vectors_changes_no_output_until_trained():
    model = word_model()
    attached = attach_word_vectors(model, ["Crimson", "violin", "Red", "circles", "3d"], letter_counts, dim=4,
                                   substitution_probability=0.5)
    tokenizer = attached.text_tokenizer
    assert tokenizer.config.vector_words == ("circles", "crimson", "violin")
    assert tokenizer.config.aliases["ring"] == "circle" and tokenizer.config.aliases["red"] == "red"
    assert attached.config.word_vectors == WordVectorConfig(count=tokenizer.input_vocab_size, dim=4,
                                                            substitution_probability=0.5)
    ids = torch.tensor([tokenizer.encode("a red circle, yellow face")])
    assert torch.equal(attached.embed_text(ids), model.embed_text(ids))
    # a further word's table row is its most similar known word, in the form with a leading space
    circles = tokenizer.encode(" circles")[0]
    assert tokenizer.decode([int(attached.word_vectors.learned_ids[circles])]) == " circle"
    crimson = tokenizer.encode(" crimson")[0]
    stand_in = tokenizer.decode([int(attached.word_vectors.learned_ids[crimson])])
    options = dict(height=16, width=16, num_steps=2, seed=3)
    assert attached.generate("a crimson heart", **options)[0].tobytes() == \
        model.generate("a" + stand_in + " heart", **options)[0].tobytes()
    with pytest.raises(ValueError, match="already has word vectors"):
        attach_word_vectors(attached, ["x"], letter_counts)
    assert "i̇zmir" not in attach_word_vectors(model, ["İzmir", "violin"], letter_counts, dim=4) \
        .text_tokenizer.config.vector_words  # a lower case that is not letters only has no key
    with pytest.raises(ValueError, match="need a word text tokenizer, found ByteTextTokenizer"):
        attach_word_vectors(build_model("tiny", seed=0), ["x"], letter_counts)
    with pytest.raises(ValueError, match="keeps its text tokenizer"):
        replace_text_tokenizer(attached, WordTextTokenizer(WordTextTokenizerConfig(words=WORDS)))


def test_a_model_with_vectors_trains_saves_and_loads(tmp_path):
    attached = attach_word_vectors(word_model(), ["crimson", "violin"], letter_counts, dim=4,
                                   substitution_probability=0.5)
    attached.train()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    optimizer = torch.optim.SGD(attached.word_vectors.parameters(), lr=1.0)
    loss = attached(attached.prepare_batch(images, ["a crimson violin", "a red circle"], image_first=[False, False]),
                    generator=torch.Generator().manual_seed(0))
    assert loss.num_text_tokens > 0 and torch.isfinite(loss.total)
    loss.total.backward()
    optimizer.step()
    assert attached.word_vectors.projection.weight.abs().sum() > 0
    attached.save_pretrained(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["word_vectors"]["count"] == attached.text_tokenizer.input_vocab_size
    loaded = NextStep.from_pretrained(tmp_path / "model").eval()
    for name, tensor in attached.word_vectors.state_dict().items():
        assert torch.equal(loaded.word_vectors.state_dict()[name], tensor), name
    ids = torch.tensor([attached.text_tokenizer.encode("a crimson violin")])
    assert torch.equal(loaded.embed_text(ids), attached.eval().embed_text(ids))


def test_a_tokenizer_with_vector_words_needs_a_model_with_vectors():
    model = word_model()
    with pytest.raises(ValueError, match="need one word vector each"):
        NextStep(model.image_tokenizer, with_vectors(), model.backbone, model.image_head, model.sampler, model.config)


def test_the_command_attaches_vectors(tmp_path, monkeypatch, capsys):
    import nextstep.tokenizers.word_vector_table as table

    word_model().save_pretrained(tmp_path / "model")
    monkeypatch.setattr(table, "sentence_encoder_word_vectors",
                        lambda model, dim, substitution_probability: attach_word_vectors(
                            model, ["crimson"], letter_counts, dim=dim,
                            substitution_probability=substitution_probability))
    assert main(["add-word-vectors", str(tmp_path / "model"), str(tmp_path / "out"), "--dim", "3"]) == 0
    assert "1 further words, 3 components" in capsys.readouterr().out
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["word_vectors"] == {"count": config["backbone"]["vocab_size"] + 1, "dim": 3,
                                      "substitution_probability": 0.2}


def test_a_further_word_reads_its_own_vector_not_its_stand_in_s():
    from nextstep.layers.word_vectors import WordVectorConfig, WordVectorInput

    module = WordVectorInput(WordVectorConfig(count=4, dim=2), table_size=3, hidden_size=2)
    vectors = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    module.set_vectors(vectors, torch.tensor([0, 1, 2, 1]))  # id 3 stands in as id 1 in the table
    with torch.no_grad():
        module.projection.weight.copy_(torch.eye(2))
    table, added = module(torch.tensor([[3]]))
    assert table.tolist() == [[1]]
    torch.testing.assert_close(added[0, 0], torch.tensor([0.0, 1.0]), atol=0.01, rtol=0)


def test_attaching_vectors_keeps_the_tokenizer_s_own_aliases_of_known_words():
    model = build_model("tiny", seed=0)
    own = {"ring": "circle", "heart": "face"}
    replace_text_tokenizer(model, WordTextTokenizer(WordTextTokenizerConfig(words=WORDS, aliases=own)))
    attached = attach_word_vectors(model, ["violin"], letter_counts, dim=4)
    aliases = attached.text_tokenizer.config.aliases
    assert aliases["heart"] == "face" and aliases["ring"] == "circle" and aliases["red"] == "red"
    assert attached.text_tokenizer.encode("Heart") == model.text_tokenizer.encode("Heart")


def test_an_aliased_word_named_as_a_further_word_reads_through_its_vector_instead():
    attached = attach_word_vectors(word_model(), ["ring", "violin"], letter_counts, dim=4)
    config = attached.text_tokenizer.config
    assert config.vector_words == ("ring", "violin") and "ring" not in config.aliases
    assert attached.text_tokenizer.encode(" ring") == [attached.text_tokenizer.vocab_size]


def test_a_further_word_stands_in_as_its_nearest_word_with_a_leading_space_where_the_vocabulary_has_one():
    attached = attach_word_vectors(word_model(), ["faces", "yellowish"], letter_counts, dim=4)
    tokenizer = attached.text_tokenizer
    stand_ins = {word: tokenizer.decode([int(attached.word_vectors.learned_ids[tokenizer.encode(" " + word)[0]])])
                 for word in ("faces", "yellowish")}
    assert stand_ins == {"faces": " face", "yellowish": "yellow"}  # the vocabulary has no " yellow"


def test_attached_vectors_take_the_model_s_dtype():
    attached = attach_word_vectors(word_model().to(torch.bfloat16), ["crimson"], letter_counts, dim=4)
    assert attached.word_vectors.projection.weight.dtype == torch.bfloat16
    ids = torch.tensor([attached.text_tokenizer.encode("a crimson heart")])
    assert attached.embed_text(ids).dtype == torch.bfloat16


def test_principal_components_are_centred_and_keep_every_distance_with_all_axes():
    data = torch.randn(60, 4, generator=torch.Generator().manual_seed(1)) * torch.tensor([4.0, 2, 1, 0.5])
    shifted = data + torch.tensor([30.0, -20.0, 5.0, 1.0])
    components = principal_components(shifted, 4)
    torch.testing.assert_close(components.mean(dim=0), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(components, principal_components(data, 4), atol=1e-4, rtol=0)
    def distances(points):
        return (points[:, None] - points[None]).norm(dim=-1)

    torch.testing.assert_close(distances(components), distances(data), atol=1e-3, rtol=1e-4)


def test_attached_vectors_have_unit_mean_square_over_the_words_that_have_one():
    attached = attach_word_vectors(word_model(), ["crimson", "violin", "circles"], letter_counts, dim=4)
    vectors = attached.word_vectors.vectors().float()
    rows = vectors[vectors.abs().sum(dim=1) > 0]
    assert rows.shape[0] > 3
    assert abs(float(rows.square().mean()) - 1.0) < 0.02


@given(seed=st.integers(0, 2**16), flip=st.booleans())
def test_each_principal_axis_points_along_its_largest_coordinate(seed, flip):
    data = torch.randn(40, 3, generator=torch.Generator().manual_seed(seed)).double() * torch.tensor([3.0, 2, 1])
    data = -data if flip else data
    centred = data - data.mean(dim=0)
    axes = torch.linalg.lstsq(centred, principal_components(data, 3).double()).solution  # (D, dim)
    largest = axes.gather(0, axes.abs().argmax(dim=0, keepdim=True))
    assert (largest > 0).all()
