"""replace_text_tokenizer: a trained model gets a new text vocabulary and keeps what it knows."""

import pytest
import torch

from nextstep import build_model
from nextstep.backbones import HFBackbone, HFBackboneConfig
from nextstep.config import ComponentSpec
from nextstep.presets import tiny
from nextstep.retokenize import replace_text_tokenizer, vocabulary_transfer
from nextstep.tokenizers import ByteTextTokenizer, WordTextTokenizer, WordTextTokenizerConfig
from nextstep.tokenizers.special_tokens import BEGIN_OF_IMAGE, NEXTSTEP_SPECIAL_TOKENS

CAPTIONS = ["a red circle to the left of a blue square", "three red squares", "grinning face"]


def words():
    return WordTextTokenizer(WordTextTokenizerConfig(min_count=1)).fit(CAPTIONS)


def image_loss(model, captions, seed=0):
    torch.manual_seed(seed)
    images = torch.rand(len(captions), 3, 32, 32) * 2 - 1
    batch = model.prepare_batch(images, captions, image_first=[False] * len(captions))
    return model(batch, generator=torch.Generator().manual_seed(seed))


def test_the_same_vocabulary_again_changes_nothing(trained_like_model):
    model = trained_like_model.eval()
    before = image_loss(model, CAPTIONS)
    embedding = model.backbone.input_embeddings().weight.clone()
    replace_text_tokenizer(model, ByteTextTokenizer())
    torch.testing.assert_close(model.backbone.input_embeddings().weight, embedding)
    after = image_loss(model, CAPTIONS)
    torch.testing.assert_close(after.total, before.total)


def test_word_rows_start_as_the_mean_of_their_bytes_and_specials_keep_theirs():
    model = build_model("tiny", seed=0)
    old_embedding = model.backbone.input_embeddings().weight.clone()
    old_head = model.lm_head.output_weight().clone()
    tokenizer = words()
    replace_text_tokenizer(model, tokenizer)
    assert model.text_tokenizer is tokenizer
    assert model.backbone.vocab_size == tokenizer.vocab_size == model.lm_head.output_weight().shape[0]
    assert model.backbone.config.vocab_size == tokenizer.vocab_size
    circle = tokenizer.encode(" circle")
    assert len(circle) == 1
    byte_ids = list(b" circle")
    embedding = model.backbone.input_embeddings().weight
    torch.testing.assert_close(embedding[circle[0]], old_embedding[byte_ids].mean(0))
    torch.testing.assert_close(model.lm_head.output_weight()[circle[0]], old_head[byte_ids].mean(0))
    torch.testing.assert_close(embedding[:256], old_embedding[:256])
    begin = tokenizer.special_token_id(BEGIN_OF_IMAGE)
    torch.testing.assert_close(embedding[begin], old_embedding[ByteTextTokenizer().special_token_id(BEGIN_OF_IMAGE)])


def test_the_other_way_round_bytes_keep_their_rows_and_specials_map_across():
    tokenizer = words()
    sources = vocabulary_transfer(tokenizer, ByteTextTokenizer())
    assert sources[:256] == [[value] for value in range(256)]
    assert tokenizer.encode("a") != [ord("a")]  # the word "a" has its own id; the byte keeps the byte's row
    for i, token in enumerate(NEXTSTEP_SPECIAL_TOKENS):
        assert sources[257 + i] == [tokenizer.special_token_id(token)]


def test_a_retokenized_model_trains_saves_and_generates(tmp_path):
    model = build_model("tiny", seed=0)
    replace_text_tokenizer(model, words())
    output = image_loss(model, CAPTIONS)
    output.total.backward()
    assert model.backbone.input_embeddings().weight.grad is not None
    model.save_pretrained(tmp_path / "model")
    again = type(model).from_pretrained(tmp_path / "model").eval()
    assert again.text_tokenizer.words == model.text_tokenizer.words
    images = again.generate(["a red circle"], height=32, width=32, num_steps=2, cfg=2.0, seed=0)
    assert images[0].size == (32, 32)


def test_a_tied_head_stays_tied():
    preset = tiny().replace(tie_word_embeddings=True)
    model = build_model(preset, seed=0)
    replace_text_tokenizer(model, words())
    assert model.lm_head.tied and model.lm_head.output_weight() is model.backbone.input_embeddings().weight


def test_a_huggingface_backbone_built_from_fields_takes_the_new_size(tmp_path):
    preset = tiny()
    hf_fields = {"model_type": "qwen2", **{k: v for k, v in preset.backbone.config.to_hf_config().items()
                                          if k not in ("model_type", "architectures")}}
    spec = ComponentSpec("backbone", "huggingface", HFBackboneConfig(model_config=hf_fields))
    model = build_model(preset.replace(backbone=spec), seed=0)
    replace_text_tokenizer(model, words())
    assert model.backbone.config.model_config["vocab_size"] == model.text_tokenizer.vocab_size
    model.save_pretrained(tmp_path / "model")
    again = type(model).from_pretrained(tmp_path / "model")
    assert isinstance(again.backbone, HFBackbone) and again.backbone.vocab_size == model.text_tokenizer.vocab_size


def test_a_tokenizer_with_vector_words_needs_the_models_word_vectors():
    model = build_model("tiny", seed=0)
    with pytest.raises(ValueError, match=r"reads 1 vector word\(s\) beyond its vocabulary.*attach_word_vectors"):
        replace_text_tokenizer(model, words().with_vector_words(["violin"]))
    assert isinstance(model.text_tokenizer, ByteTextTokenizer)  # left as it was


def test_a_table_of_the_wrong_width_is_refused():
    model = build_model("tiny", seed=0)
    with pytest.raises(ValueError, match=r"embeddings must be \d+ wide \(hidden_size\), found 3"):
        model.backbone.set_input_embeddings(torch.nn.Embedding(10, 3))


def test_byte_level_bpe_tokens_map_through_their_bytes_both_ways(hf_tokenizer_dir):
    from nextstep.tokenizers import HFTextTokenizer, HFTextTokenizerConfig

    bpe = HFTextTokenizer(HFTextTokenizerConfig(path=str(hf_tokenizer_dir)))
    byte = ByteTextTokenizer()
    accented = bpe.encode("é")  # one token per byte where the merges do not join them
    from_bytes = vocabulary_transfer(byte, bpe)
    assert [from_bytes[i] for i in accented] == [[bpe.token_bytes(i)[0]] for i in accented]
    assert b"".join(bpe.token_bytes(i) for i in accented) == "é".encode()
    to_bytes = vocabulary_transfer(bpe, byte)
    assert to_bytes[0xC3] == [bpe.byte_id(0xC3)] and to_bytes[ord("a")] == [bpe.byte_id(ord("a"))]
    assert bpe.token_bytes(bpe.begin_of_image_id) is None  # added tokens map by their name


def test_an_old_id_at_the_table_size_is_refused_by_name():
    from nextstep.retokenize import replace_text_tokenizer
    from nextstep.tokenizers import ByteTextTokenizer
    from nextstep.tokenizers.special_tokens import END_OF_TEXT

    model = build_model("tiny", seed=0)
    size = model.backbone.vocab_size

    class Overflowing(ByteTextTokenizer):
        def special_token_id(self, token):
            return size if token == END_OF_TEXT else super().special_token_id(token)

    model.text_tokenizer = Overflowing()
    with pytest.raises(ValueError, match="beyond the backbone"):
        replace_text_tokenizer(model, ByteTextTokenizer())


def test_a_partial_character_starts_from_its_decoded_text_where_the_old_tokenizer_has_no_byte_ids(hf_tokenizer_dir):
    from nextstep.tokenizers import HFTextTokenizer, HFTextTokenizerConfig

    class WithoutByteIds(ByteTextTokenizer):
        def byte_id(self, value):
            return None

    bpe = HFTextTokenizer(HFTextTokenizerConfig(path=str(hf_tokenizer_dir)))
    old = WithoutByteIds()
    accented = bpe.encode("é")  # two tokens, each one byte of the character
    sources = vocabulary_transfer(old, bpe)
    for token in accented:
        assert bpe.decode([token]) == "\ufffd"
        assert sources[token] == old.encode("\ufffd") != []
