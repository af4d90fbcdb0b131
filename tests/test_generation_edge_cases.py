"""Edge cases of generation, reranking, text generation, compilation, the registry, builders and checkpoints."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

from nextstep import build_model
from nextstep.backbones import ahead_of_time
from nextstep.builders import build_component, load_model
from nextstep.compile import CompileConfig, SafeCompiled, compile_module, safe_compile
from nextstep.config import ComponentSpec
from nextstep.generation import check_seed, encode_each, generate_tokens
from nextstep.generation_defaults import GenerationDefaults
from nextstep.heads.lm_head import LMHead
from nextstep.image_decoder import replace_image_decoder
from nextstep.presets import tiny
from nextstep.registry import component_class, component_names, register_component
from nextstep.reranking import (
    CANDIDATE_SCORES,
    best_candidates,
    candidate_score_function,
    prompt_flow_gain,
    prompt_log_likelihood,
)
from nextstep.samplers import HeunSampler
from nextstep.text_generation import generate_text
from nextstep.weights import checkpoint_shards


@given(st.integers(min_value=-(2**64), max_value=2**64))
def test_a_seed_is_accepted_exactly_in_zero_to_two_to_the_63(seed):
    """check_seed accepts integers in [0, 2**63) and refuses the rest, the upper bound included."""
    if 0 <= seed < 2**63:
        check_seed(seed)
    else:
        with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*63\)"):
            check_seed(seed)


def test_the_largest_seed_is_accepted_and_the_next_one_refused():
    """The bound of the seed range is exclusive at 2**63."""
    check_seed(2**63 - 1)
    with pytest.raises(ValueError, match="seed must be in"):
        check_seed(2**63)


def test_encoding_images_with_a_seed_count_unlike_the_image_count_is_refused(tiny_model):
    """encode_each wants one seed per image and names both counts otherwise."""
    images = [torch.zeros(1, 3, 32, 32)]
    with pytest.raises(ValueError, match=r"expected one seed per image \(1\), found 2"):
        encode_each(tiny_model, images, seeds=[0, 1])


def test_use_norm_layer_normalises_every_sampled_token(trained_like_model):
    """With use_norm every returned token has zero mean and unit variance over its features, and the first
    token is the layer norm of the one drawn without it (later ones read the normalised tokens back)."""
    kwargs = dict(height=32, width=32, num_steps=2, cfg=1.0, seed=3)
    normed, _, _ = generate_tokens(trained_like_model, "a red circle", use_norm=True, **kwargs)
    raw, _, _ = generate_tokens(trained_like_model, "a red circle", use_norm=False, **kwargs)
    torch.testing.assert_close(normed.mean(dim=-1), torch.zeros(normed.shape[:-1]), atol=1e-4, rtol=0)
    torch.testing.assert_close(normed.var(dim=-1, unbiased=False), torch.ones(normed.shape[:-1]), atol=1e-3, rtol=0)
    first = raw[:, 0]
    torch.testing.assert_close(
        normed[:, 0], nn.functional.layer_norm(first, first.shape[-1:], eps=1e-6), atol=1e-4, rtol=1e-4
    )
    assert not torch.allclose(raw.var(dim=-1, unbiased=False), torch.ones(raw.shape[:-1]), atol=1e-2)


def test_candidate_rows_not_divisible_by_the_candidate_count_are_refused():
    """best_candidates names the row count when it does not split into groups of K candidates."""
    with pytest.raises(ValueError, match="rows divisible by 2 candidates, found 5 rows"):
        best_candidates(torch.zeros(5, 2, 3), torch.zeros(5), 2)


@pytest.mark.parametrize("score", [prompt_flow_gain, prompt_log_likelihood])
def test_a_score_batch_size_below_one_is_named(tiny_model, score):
    """Both candidate scores refuse batch_size 0 with a message that names it."""
    tokens = torch.zeros(1, 1, tiny_model.token_dim)
    with pytest.raises(ValueError, match="batch_size must be >= 1, found 0"):
        score(tiny_model, ["a"], tokens, 1, 1, batch_size=0)


def test_candidate_scores_map_each_name_to_its_own_function():
    """``flow`` ranks by prompt_flow_gain and ``caption`` by prompt_log_likelihood."""
    assert CANDIDATE_SCORES == {"flow": prompt_flow_gain, "caption": prompt_log_likelihood}
    assert candidate_score_function("caption") is prompt_log_likelihood
    assert candidate_score_function("flow") is prompt_flow_gain


def test_text_generation_writes_32_ids_by_default(tiny_model):
    """Without stop ids a row writes max_new_tokens ids, 32 unless given."""
    ids = tiny_model.text_tokenizer.encode("a circle")
    written = generate_text(tiny_model, [(ids, [])], stop_ids=[])
    assert [len(row) for row in written.ids] == [32] and written.stopped == [False]


def test_a_stop_id_the_tokenizer_cannot_decode_is_refused_as_out_of_range(tiny_model):
    """Stop ids must be decodable: a class of a padded head past the tokenizer is named as out of range."""
    tokenizer = tiny_model.text_tokenizer
    tiny_model.lm_head = LMHead(tiny_model.lm_head.hidden_size, tokenizer.vocab_size + 8)
    ids = tokenizer.encode("a")
    with pytest.raises(ValueError, match=rf"stop_ids must be ids in \[0, {tokenizer.vocab_size}\)"):
        generate_text(tiny_model, [(ids, [])], stop_ids=[tokenizer.vocab_size + 2])


def test_replacing_the_decoder_with_something_that_is_not_a_vae_is_named(tiny_model):
    """replace_image_decoder names the wrong type of the given tokenizer instead of failing on an attribute."""
    with pytest.raises(
        ValueError, match="expected two FluxVAE image tokenizers, found FluxVAE in the model and Linear given"
    ):
        replace_image_decoder(tiny_model, nn.Linear(2, 2))


def test_compilation_is_off_unless_a_config_enables_it():
    """CompileConfig is disabled by default, and compile_module with it leaves the forward eager."""
    assert CompileConfig().enabled is False
    module = nn.Linear(3, 3)
    forward = module.forward
    assert compile_module(module, CompileConfig()) is module
    assert not isinstance(module.forward, SafeCompiled) and module.forward == forward


def test_compiling_something_that_is_not_callable_is_a_type_error():
    """safe_compile refuses a non-callable at once instead of falling back later."""
    with pytest.raises(TypeError, match="safe_compile needs a callable, found int"):
        safe_compile(5)


def test_ahead_of_time_compilation_needs_export_and_both_aot_inductor_entry_points(monkeypatch):
    """ahead_of_time_available is True exactly when torch.export and AOTInductor packaging and loading exist."""
    inductor = torch._inductor
    monkeypatch.setattr(inductor, "aoti_compile_and_package", lambda *a, **k: None, raising=False)
    monkeypatch.setattr(inductor, "aoti_load_package", lambda *a, **k: None, raising=False)
    assert ahead_of_time.ahead_of_time_available()
    monkeypatch.delattr(inductor, "aoti_load_package")
    assert not ahead_of_time.ahead_of_time_available()


@pytest.fixture
def own_sampler_names(monkeypatch):
    """The sampler names as they are, restored after the test (names registered in it are forgotten)."""
    from nextstep import registry

    component_names("sampler")
    monkeypatch.setitem(registry._COMPONENTS, "sampler", dict(registry._COMPONENTS["sampler"]))


def test_registering_the_same_class_twice_under_its_name_is_allowed(own_sampler_names):
    """A name already held by the very same class is no clash, even without replace."""

    class TwiceRegisteredHeun(HeunSampler):
        pass

    register_component("sampler", "test_edge_twice_registered")(TwiceRegisteredHeun)
    register_component("sampler", "test_edge_twice_registered")(TwiceRegisteredHeun)
    assert component_class("sampler", "test_edge_twice_registered") is TwiceRegisteredHeun


def test_an_unknown_component_kind_is_refused_when_the_decorator_is_made():
    """register_component names the known kinds for an unknown one before any class is given."""
    with pytest.raises(ValueError, match=r"kind must be one of \['backbone', 'image_head'"):
        register_component("no_such_kind", "x")


def test_component_names_are_sorted(own_sampler_names):
    """component_names lists each kind's names in sorted order, not in the order they were registered."""
    for name in ("zz_test_edge_heun", "aa_test_edge_heun"):
        register_component("sampler", name)(type(name, (HeunSampler,), {}))
    for kind in ComponentSpec.kinds:
        names = component_names(kind)
        assert names == sorted(names) and names


def test_model_config_defaults_are_the_release_ones():
    """A preset leaves the release's loss weights, text dropout and un-normalised tokens."""
    config = tiny()
    assert config.image_first_probability == 0.3
    assert config.text_loss_weight == 0.01 and config.image_loss_weight == 1.0
    assert config.use_norm is False
    assert config.generation == GenerationDefaults()


def test_a_component_spec_in_the_wrong_slot_is_named():
    """A backbone spec given as the image head is refused as a spec of the wrong kind."""
    config = tiny()
    with pytest.raises(ValueError, match="image_head must be a ComponentSpec of kind 'image_head'"):
        config.replace(image_head=config.backbone)


def test_building_a_component_from_another_components_config_is_refused():
    """build_component names the config class the registered component takes."""
    spec = ComponentSpec("sampler", "euler", GenerationDefaults())
    with pytest.raises(
        ValueError,
        match=r"sampler 'euler' \(EulerSampler\) takes a EulerSamplerConfig, found "
        "GenerationDefaults",
    ):
        build_component(spec)


@pytest.mark.parametrize("name", ["", "   "])
def test_loading_a_blank_name_is_refused_with_what_is_expected(name):
    """load_model names what it expects for an empty or blank name."""
    with pytest.raises(ValueError, match="load_model expects a model directory, a shipped model's name or a preset"):
        load_model(name)


def test_a_preset_loads_with_the_weights_of_seed_zero():
    """load_model of a preset name builds the weights that build_model draws under seed 0."""
    loaded = load_model("tiny")
    built = build_model("tiny", seed=0)
    for (name, left), (_, right) in zip(loaded.state_dict().items(), built.state_dict().items()):
        torch.testing.assert_close(left, right, msg=name)


def _save(path):
    save_file({"w": torch.zeros(2)}, str(path))


def test_a_directory_prefers_the_model_index_over_other_indexes(tmp_path):
    """model.safetensors.index.json wins over another index file in the same directory."""
    _save(tmp_path / "a.safetensors")
    _save(tmp_path / "b.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"w": "b.safetensors"}}')
    (tmp_path / "other.safetensors.index.json").write_text('{"weight_map": {"w": "a.safetensors"}}')
    assert checkpoint_shards(tmp_path) == [tmp_path / "b.safetensors"]


def test_a_directory_with_several_other_indexes_falls_back_to_model_safetensors(tmp_path):
    """Two non-standard index files are ambiguous: the single model.safetensors is used instead."""
    _save(tmp_path / "a.safetensors")
    _save(tmp_path / "model.safetensors")
    (tmp_path / "first.safetensors.index.json").write_text('{"weight_map": {"w": "a.safetensors"}}')
    (tmp_path / "second.safetensors.index.json").write_text('{"weight_map": {"w": "a.safetensors"}}')
    assert checkpoint_shards(tmp_path) == [tmp_path / "model.safetensors"]


def test_a_directory_with_model_safetensors_ignores_other_safetensors_files(tmp_path):
    """model.safetensors is the checkpoint even beside other .safetensors files."""
    _save(tmp_path / "extra.safetensors")
    _save(tmp_path / "model.safetensors")
    assert checkpoint_shards(tmp_path) == [tmp_path / "model.safetensors"]


def test_tokens_that_split_a_character_start_from_the_rows_of_their_bytes(tmp_path):
    """A byte-level BPE token holding part of a multi-byte character maps to the byte tokenizer's ids of its
    bytes, not to the encoding of a replacement character."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from nextstep.retokenize import vocabulary_transfer
    from nextstep.tokenizers import ByteTextTokenizer, HFTextTokenizer, HFTextTokenizerConfig

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=290, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(["日本 中文 日本語 東京"] * 20, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>").save_pretrained(str(tmp_path))
    bpe = HFTextTokenizer(HFTextTokenizerConfig(path=str(tmp_path)))
    byte = ByteTextTokenizer()
    sources = vocabulary_transfer(byte, bpe)
    partial = []
    for token_id in range(bpe.vocab_size):
        data = bpe.token_bytes(token_id)
        if data is None or len(data) < 2:
            continue
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            partial.append(token_id)
            assert sources[token_id] == [byte.byte_id(value) for value in data]
    assert partial


def test_pad_and_image_placeholder_ids_are_never_written(tiny_model):
    """With everything else banned and the rest drawn uniformly, rows write only end-of-text."""
    tokenizer = tiny_model.text_tokenizer
    with torch.no_grad():
        tiny_model.lm_head.output_weight().zero_()
    kept = {tokenizer.eos_id, tokenizer.pad_id, tokenizer.image_placeholder_id}
    banned = [i for i in range(tokenizer.vocab_size) if i not in kept]
    rows = [(tokenizer.encode("a"), [])] * 16
    written = generate_text(tiny_model, rows, max_new_tokens=1, temperature=1.0, banned_ids=banned)
    assert written.ids == [[tokenizer.eos_id]] * 16


def test_an_unknown_vae_size_is_refused_with_the_known_ones():
    """flux_vae_config names the known sizes instead of returning some default."""
    from nextstep.presets import flux_vae_config

    with pytest.raises(ValueError, match=r"unknown VAE size 'huge'; known: \['flux', 'tiny'\]"):
        flux_vae_config("huge")


def test_an_index_with_an_empty_weight_map_is_refused(tmp_path):
    """An index that lists no tensors is named as empty, not read as a checkpoint without shards."""
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    with pytest.raises(ValueError, match="'weight_map' must map each key to its shard file, found an empty one"):
        checkpoint_shards(tmp_path)
