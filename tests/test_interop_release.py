"""The published NextStep-1 directory layout: load, convert to the library's layout and back, bad input."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from interop_synthetic import (
    RELEASE_ADDED_TOKENS,
    ReleaseShapes,
    write_qwen_checkpoint,
    write_release_checkpoint,
)
from safetensors.torch import load_file, save_file

from nextstep.config import ComponentSpec
from nextstep.interop import (
    RELEASE_FIELDS,
    detect_model_layout,
    load_release_checkpoint,
    release_config_from_model,
    release_key_to_model_key,
    save_release_checkpoint,
)
from nextstep.interop.release_checkpoint import plan_shards
from nextstep.layers.word_vectors import WordVectorConfig
from nextstep.model import NextStep
from nextstep.samplers.euler import EulerSamplerConfig
from nextstep.weights import read_checkpoint_index

SMALL = ReleaseShapes(vocab_size=320)
RELEASE_IDS = {"[PAD]": 151665, "<|image_area|>": 151666, "<|begin_of_image|>": 151667,
               "<|end_of_image|>": 151668, "<|image_placeholder|>": 151669}


def read_shards(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    return tensors


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A release directory with the real Qwen2.5 vocabulary, three shards, float32 weights."""
    directory = tmp_path_factory.mktemp("release") / "NextStep-1-Large"
    tensors = write_release_checkpoint(directory, ReleaseShapes(), num_shards=3)
    return directory, tensors


@pytest.fixture(scope="module")
def loaded(release):
    return NextStep.from_pretrained(release[0])


def small_release(directory: Path, **options) -> dict[str, torch.Tensor]:
    return write_release_checkpoint(directory, SMALL, vocabulary="small", num_shards=2, **options)


# ---------------------------------------------------------------------- loading
def test_every_release_tensor_lands_in_the_model(release, loaded):
    directory, tensors = release
    assert detect_model_layout(directory) == "release"
    state = loaded.state_dict()
    for name, tensor in tensors.items():
        target = release_key_to_model_key(name)
        if target is None:
            assert name == "gen_pos_embed"
            continue
        assert torch.equal(state[target], tensor), name
    vae_state = torch.load(directory / "vae" / "checkpoint.pt", weights_only=True)
    for name, tensor in vae_state.items():
        assert torch.equal(state[f"image_tokenizer.{name}"], tensor), name
    assert {k for k in state if not k.startswith("image_tokenizer.")} == \
        {release_key_to_model_key(k) for k in tensors if k != "gen_pos_embed"}



@pytest.mark.parametrize("tied", [False, True])
def test_keys_with_a_model_prefix_load_the_same(tmp_path, tied):
    """Shards whose every key carries Hugging Face's ``model.`` prefix load as the release's own names do (a tied
    model's LM head key, prefixed too, is not read)."""
    directory = tmp_path / "prefixed"
    tensors = small_release(directory, tie_word_embeddings=tied)
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for shard in sorted(directory.glob("*.safetensors")):
        save_file({f"model.{name}": tensor for name, tensor in load_file(str(shard)).items()}, str(shard))
    index["weight_map"] = {f"model.{name}": file for name, file in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    state = NextStep.from_pretrained(directory).state_dict()
    for name, tensor in tensors.items():
        target = release_key_to_model_key(name)
        assert target == release_key_to_model_key(f"model.{name}")
        if target is not None and target in state:
            assert torch.equal(state[target], tensor), name
    assert ("lm_head.weight" in state) is not tied


def test_config_fields_map_onto_the_components(release, loaded):
    config = json.loads((release[0] / "config.json").read_text())
    backbone = loaded.backbone.config
    assert (backbone.vocab_size, backbone.hidden_size, backbone.intermediate_size, backbone.num_layers,
            backbone.num_heads, backbone.num_kv_heads) == (151680, 32, 48, 2, 4, 2)
    assert backbone.attention_bias and not backbone.output_attention_bias
    assert backbone.rope_theta == config["rope_theta"] and backbone.rms_norm_eps == config["rms_norm_eps"]
    head = loaded.image_head.config
    assert (head.width, head.depth, head.token_dim, head.condition_dim, head.batch_mul) == (24, 2, 16, 32, 4)
    vae = loaded.image_tokenizer.config
    assert (vae.z_channels, vae.patch_size, vae.normalization, vae.ch) == (4, 2, "layer_norm", 32)
    assert loaded.image_tokenizer.pixels_per_token == 16
    assert loaded.config.text_loss_weight == 0.01 and loaded.config.image_loss_weight == 1.0
    assert not loaded.lm_head.tied
    # Left unset, a call generates as the release examples do: 512x512, CFG 7.5, 50 head steps.
    generation = loaded.config.generation
    assert (generation.height, generation.width, generation.cfg, generation.num_steps) == (512, 512, 7.5, 50)


def test_tokenizer_has_the_special_tokens_at_the_release_ids(loaded):
    import quicktok

    tokenizer = loaded.text_tokenizer
    assert tokenizer.vocab_size == 151674
    assert {token: tokenizer.special_token_id(token) for token in RELEASE_IDS} == RELEASE_IDS
    assert tokenizer.special_token_id(RELEASE_ADDED_TOKENS[-1]) == 151673
    assert tokenizer.eos_id == 151643
    text = "A frosty beer mug with 'CHEERS TO US' engraved on the side. 16*16"
    assert tokenizer.encode(text) == list(quicktok.get_encoding("qwen3").encode(text))
    prompt = loaded.sequences.prompt("a cat", 16, 16)
    assert prompt[-7:] == [151666, 16, 21, 9, 16, 21, 151667]


def test_dtype_defaults_to_the_shards_and_can_be_chosen(tmp_path):
    small_release(tmp_path / "bf16", dtype=torch.bfloat16)
    model = NextStep.from_pretrained(tmp_path / "bf16")
    assert model.backbone.embed_tokens.weight.dtype == torch.bfloat16
    # The VAE keeps the dtype of vae/checkpoint.pt (float32 here) unless a dtype is given.
    assert {p.dtype for p in model.image_tokenizer.parameters()} == {torch.float32}
    model = NextStep.from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    model = NextStep.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_the_default_sampler_of_a_loaded_release_is_named_or_given(release):
    from nextstep.samplers import FlowSDESampler

    model = load_release_checkpoint(release[0], sampler="flow_sde")  # NextStep-1.1's sde mode
    assert isinstance(model.sampler, FlowSDESampler) and model.config.sampler.type == "flow_sde"
    assert load_release_checkpoint(release[0], sampler="euler").config.sampler.type == "euler"
    with pytest.raises(ValueError, match="unknown sampler 'sde'"):
        load_release_checkpoint(release[0], sampler="sde")


def test_a_float_tensor_stored_as_integers_is_named_in_release_terms(tmp_path):
    small_release(tmp_path / "ints")
    shard, name = next((shard, name) for shard in sorted((tmp_path / "ints").glob("model-*.safetensors"))
                       for name in load_file(str(shard)) if name.endswith("norm.weight"))
    tensors = load_file(str(shard))
    save_file({**tensors, name: tensors[name].to(torch.int32)}, str(shard), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"tensors of another kind \[{re.escape(name)}: expected floating-point "
                                         r"values, found I32\]"):
        NextStep.from_pretrained(tmp_path / "ints")


def test_shards_that_mix_dtypes_load_as_the_most_common_one_with_a_warning(tmp_path):
    small_release(tmp_path / "mixed", dtype=torch.bfloat16)
    shard = sorted((tmp_path / "mixed").glob("model-*.safetensors"))[0]
    tensors = load_file(str(shard))
    name = next(iter(tensors))
    save_file({**tensors, name: tensors[name].float()}, str(shard), metadata={"format": "pt"})
    with pytest.warns(UserWarning, match=r"mix dtypes .*'F32': 1, 'BF16'.*torch.bfloat16: pass dtype="):
        model = NextStep.from_pretrained(tmp_path / "mixed")
    assert model.backbone.embed_tokens.weight.dtype == torch.bfloat16


def test_tensors_that_do_not_load_do_not_count_towards_the_dtype(tmp_path, recwarn):
    """The release's derived ``gen_pos_embed`` is a float32 buffer beside bfloat16 weights."""
    small_release(tmp_path / "release", dtype=torch.bfloat16)
    index = json.loads((tmp_path / "release" / "model.safetensors.index.json").read_text())
    shard = tmp_path / "release" / index["weight_map"]["gen_pos_embed"]
    tensors = load_file(str(shard))
    save_file({**tensors, "gen_pos_embed": tensors["gen_pos_embed"].float()}, str(shard), metadata={"format": "pt"})
    model = NextStep.from_pretrained(tmp_path / "release")
    assert model.backbone.embed_tokens.weight.dtype == torch.bfloat16
    assert not [warning for warning in recwarn if "mix dtypes" in str(warning.message)]


def test_round_trips_keep_a_float32_vae_beside_bfloat16_shards(tmp_path):
    small_release(tmp_path / "release", dtype=torch.bfloat16)
    original = torch.load(tmp_path / "release" / "vae" / "checkpoint.pt", weights_only=True)
    model = NextStep.from_pretrained(tmp_path / "release")
    save_release_checkpoint(model, tmp_path / "direct")
    model.save_pretrained(tmp_path / "native")
    native = NextStep.from_pretrained(tmp_path / "native")
    assert native.backbone.embed_tokens.weight.dtype == torch.bfloat16
    assert {p.dtype for p in native.image_tokenizer.parameters()} == {torch.float32}
    save_release_checkpoint(native, tmp_path / "via-native")
    for written in (tmp_path / "direct", tmp_path / "via-native"):
        assert {t.dtype for t in read_shards(written).values()} == {torch.bfloat16}
        vae = torch.load(written / "vae" / "checkpoint.pt", weights_only=True)
        assert vae.keys() == original.keys()
        assert all(vae[k].dtype == torch.float32 and torch.equal(vae[k], original[k]) for k in original)
    # A bfloat16 vae/checkpoint.pt stays bfloat16 too.
    checkpoint = tmp_path / "release" / "vae" / "checkpoint.pt"
    torch.save({k: v.to(torch.bfloat16) for k, v in original.items()}, checkpoint)
    model = NextStep.from_pretrained(tmp_path / "release")
    assert {p.dtype for p in model.image_tokenizer.parameters()} == {torch.bfloat16}
    save_release_checkpoint(model, tmp_path / "bf16-vae")
    written = torch.load(tmp_path / "bf16-vae" / "vae" / "checkpoint.pt", weights_only=True)
    assert {v.dtype for v in written.values()} == {torch.bfloat16}


def test_tied_embeddings_and_output_bias_variants(tmp_path):
    tensors = small_release(tmp_path / "tied", tie_word_embeddings=True)
    model = NextStep.from_pretrained(tmp_path / "tied")
    assert model.lm_head.tied
    assert torch.equal(model.lm_head.output_weight(), tensors["embed_tokens.weight"])
    tensors = small_release(tmp_path / "bias", output_bias=True, o_attention_bias=None)
    model = NextStep.from_pretrained(tmp_path / "bias")
    assert model.backbone.config.output_attention_bias
    assert torch.equal(model.backbone.layers[1].self_attn.o_proj.bias, tensors["layers.1.self_attn.o_proj.bias"])


# --------------------------------------------------------------- round trips
def test_release_to_native_and_back_keeps_every_tensor(release, loaded, tmp_path):
    directory, tensors = release
    loaded.save_pretrained(tmp_path / "native")
    assert detect_model_layout(tmp_path / "native") == "native"
    native = NextStep.from_pretrained(tmp_path / "native")
    save_release_checkpoint(native, tmp_path / "again", max_shard_size=8 * 1024**2)

    again = tmp_path / "again"
    index = json.loads((again / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    written = read_shards(again)
    assert set(written) == set(tensors) - {"gen_pos_embed"} == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in written.values())
    for name, tensor in written.items():
        assert tensor.dtype == tensors[name].dtype and torch.equal(tensor, tensors[name]), name

    original_vae = torch.load(directory / "vae" / "checkpoint.pt", weights_only=True)
    written_vae = torch.load(again / "vae" / "checkpoint.pt", weights_only=True)
    assert original_vae.keys() == written_vae.keys()
    assert all(torch.equal(original_vae[k], written_vae[k]) for k in original_vae)
    original_vae_config = json.loads((directory / "vae" / "config.json").read_text())
    assert json.loads((again / "vae" / "config.json").read_text()) == original_vae_config

    original_config = json.loads((directory / "config.json").read_text())
    written_config = json.loads((again / "config.json").read_text())
    for field in set(RELEASE_FIELDS) - {"vae_name_or_path", "rope_scaling"}:
        assert written_config.get(field) == original_config.get(field), field
    assert written_config["torch_dtype"] == "float32"

    reloaded = NextStep.from_pretrained(again)
    assert reloaded.text_tokenizer.tokenizer.get_vocab() == loaded.text_tokenizer.tokenizer.get_vocab()
    assert reloaded.text_tokenizer.tokenizer.pad_token == "[PAD]"
    reference = loaded.state_dict()
    assert all(torch.equal(tensor, reference[key]) for key, tensor in reloaded.state_dict().items())


def test_config_values_without_effect_here_are_written_back(tmp_path):
    """``latent_size``, ``max_position_embeddings``, ``initializer_range``, ``bos_token_id``,
    ``pad_token_id`` and ``auto_map`` change nothing in this library; release -> this library -> release
    keeps them."""
    kept = {"latent_size": 64, "max_position_embeddings": 4096, "initializer_range": 0.01,
            "bos_token_id": 256, "pad_token_id": 278,
            "auto_map": {"AutoConfig": "configuration_nextstep.NextStepConfig"}}
    small_release(tmp_path / "release", **kept)
    model = NextStep.from_pretrained(tmp_path / "release")
    assert model.config.release_fields == kept
    save_release_checkpoint(model, tmp_path / "direct")
    model.save_pretrained(tmp_path / "native")
    save_release_checkpoint(NextStep.from_pretrained(tmp_path / "native"), tmp_path / "via-native")
    for written in ("direct", "via-native"):
        config = json.loads((tmp_path / written / "config.json").read_text())
        assert {name: config.get(name) for name in kept} == kept, written
    small_release(tmp_path / "without", latent_size=None, max_position_embeddings=None, initializer_range=None,
                  bos_token_id=None, auto_map=None)
    model = NextStep.from_pretrained(tmp_path / "without")
    assert model.config.release_fields == {}
    save_release_checkpoint(model, tmp_path / "without-again")
    config = json.loads((tmp_path / "without-again" / "config.json").read_text())
    assert config["latent_size"] == 32 and not {"max_position_embeddings", "initializer_range", "bos_token_id",
                                                "pad_token_id", "auto_map"} & set(config)


def test_saving_in_bfloat16_casts_the_shards(tmp_path):
    small_release(tmp_path / "release")
    model = NextStep.from_pretrained(tmp_path / "release")
    save_release_checkpoint(model, tmp_path / "bf16", dtype=torch.bfloat16)
    assert (tmp_path / "bf16" / "model.safetensors").is_file()
    infos = read_checkpoint_index(tmp_path / "bf16")
    assert {info.dtype for info in infos.values()} == {"BF16"}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    reloaded = NextStep.from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    torch.testing.assert_close(reloaded.backbone.norm.weight, model.backbone.norm.weight, atol=1e-2, rtol=1e-2)


def test_tokenizer_files_are_written_in_the_form_the_release_transformers_reads(tmp_path):
    """The release pins transformers 4.x, whose tokenizers read ``extra_special_tokens`` as a mapping:
    the additional special tokens go under ``additional_special_tokens``, with the map files beside."""
    small_release(tmp_path / "release")
    model = NextStep.from_pretrained(tmp_path / "release")
    save_release_checkpoint(model, tmp_path / "again")
    again = tmp_path / "again"
    config = json.loads((again / "tokenizer_config.json").read_text())
    assert not isinstance(config.get("extra_special_tokens", {}), list)
    assert config["additional_special_tokens"] == list(RELEASE_ADDED_TOKENS[1:])
    assert (config["eos_token"], config["pad_token"]) == ("<|endoftext|>", "[PAD]")
    special = json.loads((again / "special_tokens_map.json").read_text())
    assert special == {"eos_token": "<|endoftext|>", "pad_token": "[PAD]",
                       "additional_special_tokens": list(RELEASE_ADDED_TOKENS[1:])}
    added = json.loads((again / "added_tokens.json").read_text())
    tokenizer = model.text_tokenizer
    assert added["[PAD]"] == tokenizer.pad_id and added["<|begin_of_image|>"] == tokenizer.begin_of_image_id
    assert added["<|endoftext|>"] == tokenizer.eos_id and len(added) == 31
    reloaded = NextStep.from_pretrained(again).text_tokenizer
    assert reloaded.tokenizer.get_added_vocab() == tokenizer.tokenizer.get_added_vocab()
    assert reloaded.encode("a cat<|image_area|>") == tokenizer.encode("a cat<|image_area|>")


def test_a_release_with_another_latent_patch_size_is_written_back(tmp_path):
    """The release keeps the patch size in the model's config.json (``latent_patch_size``); its
    vae/config.json has no field for it."""
    shapes = ReleaseShapes(vocab_size=320, latent_patch_size=1)
    write_release_checkpoint(tmp_path / "release", shapes, vocabulary="small", num_shards=2)
    model = NextStep.from_pretrained(tmp_path / "release")
    assert model.image_tokenizer.config.patch_size == 1 and model.token_dim == shapes.latent_channels
    save_release_checkpoint(model, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["latent_patch_size"] == 1
    assert json.loads((tmp_path / "again" / "vae" / "config.json").read_text()) == \
        json.loads((tmp_path / "release" / "vae" / "config.json").read_text())
    reloaded = NextStep.from_pretrained(tmp_path / "again")
    assert reloaded.image_tokenizer.config == model.image_tokenizer.config
    reference = model.state_dict()
    assert all(torch.equal(tensor, reference[key]) for key, tensor in reloaded.state_dict().items())
    assert model.image_tokenizer.config.patch_size == 1


@pytest.mark.parametrize("change, match", [
    ({"word_vectors": WordVectorConfig(count=SMALL.vocab_size)}, "word_vectors must be none.*found count 320"),
    ({"time_sampling": "uniform"}, "image_head.time_sampling must be 'logit_normal'.*found 'uniform'"),
    ({"time_mean": 0.5}, "image_head.time_mean must be 0.0.*found 0.5"),
    ({"time_std": 2.0}, "image_head.time_std must be 1.0.*found 2.0"),
    ({"time_shift": 3.0}, "image_head.time_shift must be 1.0.*found 3.0"),
])
def test_settings_the_release_cannot_hold_are_refused(tmp_path, change, match):
    small_release(tmp_path / "release")
    model = NextStep.from_pretrained(tmp_path / "release")
    config = model.current_config()
    if "word_vectors" in change:
        config = config.replace(**change)
    else:
        config = config.replace(image_head=ComponentSpec("image_head", "flow_matching",
                                                         config.image_head.config.replace(**change)))
    with pytest.raises(ValueError, match=match):
        release_config_from_model(config, model.text_tokenizer)


def test_a_model_with_word_vectors_is_not_written_in_the_release_layout(tmp_path):
    small_release(tmp_path / "release")
    model = NextStep.from_pretrained(tmp_path / "release")
    model.config = model.config.replace(word_vectors=WordVectorConfig(count=SMALL.vocab_size))
    with pytest.raises(ValueError, match="word_vectors"):
        save_release_checkpoint(model, tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_generation_settings_the_release_does_not_keep_are_named_in_a_warning(tmp_path):
    small_release(tmp_path / "release")
    model = NextStep.from_pretrained(tmp_path / "release")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a model loaded from the release loses nothing
        release_config_from_model(model.current_config(), model.text_tokenizer)
    config = model.current_config().replace(
        use_norm=False, image_first_probability=0.5, generation=model.config.generation.replace(height=256),
        sampler=ComponentSpec("sampler", "euler", EulerSamplerConfig()))
    with pytest.warns(UserWarning) as caught:
        release_config_from_model(config, model.text_tokenizer)
    message = str(caught[0].message)
    for lost in ("use_norm=False (it loads as True)", "sampler 'euler' (it loads as 'euler_maruyama')",
                 "generation.height=256 (it loads as 512)", "image_first_probability=0.5 (it loads as 0.3)"):
        assert lost in message


def test_plan_shards_respects_the_limit():
    assert plan_shards([("a", 4), ("b", 4), ("c", 4)], 8) == [["a", "b"], ["c"]]
    assert plan_shards([("big", 20), ("a", 1)], 8) == [["big"], ["a"]]
    with pytest.raises(ValueError, match="max_shard_size"):
        plan_shards([("a", 1)], 0)


# ------------------------------------------------------------------ bad input
def test_a_directory_of_neither_layout_names_the_expected_files(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(FileNotFoundError) as error:
        NextStep.from_pretrained(tmp_path)
    message = str(error.value)
    for expected in ("config.json", "model.safetensors", "model.safetensors.index.json", "vae/checkpoint.pt",
                     "tokenizer.json", "weights.bin"):
        assert expected in message
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="'llama'.*model_type 'nextstep'"):
        NextStep.from_pretrained(tmp_path)


def test_release_without_weights_or_tokenizer_says_what_is_missing(tmp_path):
    small_release(tmp_path / "m")
    for path in (tmp_path / "m").glob("*.safetensors*"):
        path.unlink()
    (tmp_path / "m" / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="lacks weights.*and tokenizer files"):
        NextStep.from_pretrained(tmp_path / "m")


def _rewrite_shard_holding(directory: Path, key: str, change) -> None:
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    path = directory / index["weight_map"][key]
    state = load_file(str(path))
    change(state)
    save_file(state, str(path), metadata={"format": "pt"})


def test_shape_mismatch_missing_and_unexpected_keys_are_named(tmp_path):
    small_release(tmp_path / "m")

    def damage(state):
        state["layers.1.mlp.up_proj.weight"] = torch.zeros(50, 32)
        state.pop("image_in_projector.bias", None)
        state["layers.7.mlp.up_proj.weight"] = torch.zeros(2)

    _rewrite_shard_holding(tmp_path / "m", "layers.1.mlp.up_proj.weight", damage)
    _rewrite_shard_holding(tmp_path / "m", "image_in_projector.bias",
                           lambda state: state.pop("image_in_projector.bias", None))
    with pytest.raises(ValueError) as error:
        NextStep.from_pretrained(tmp_path / "m")
    message = str(error.value)
    assert "layers.1.mlp.up_proj.weight: expected (48, 32), found (50, 32)" in message
    assert "missing keys ['image_in_projector.bias']" in message
    assert "unexpected keys ['layers.7.mlp.up_proj.weight']" in message


class _Payload:
    """An object whose unpickling needs this module's code."""


def test_a_vae_pickle_that_needs_code_is_refused(tmp_path):
    small_release(tmp_path / "m")
    torch.save({"encoder.conv_in.weight": torch.zeros(1), "extra": _Payload()},
               str(tmp_path / "m" / "vae" / "checkpoint.pt"))
    with pytest.raises(ValueError, match="code execution.*refused"):
        NextStep.from_pretrained(tmp_path / "m")


def test_missing_vae_lists_the_places_tried_and_vae_path_overrides(tmp_path):
    small_release(tmp_path / "m")
    shutil.move(str(tmp_path / "m" / "vae"), str(tmp_path / "tokenizer-f8ch16"))
    with pytest.raises(FileNotFoundError, match="vae.*NextStep-1-f8ch16-Tokenizer"):
        NextStep.from_pretrained(tmp_path / "m")
    model = load_release_checkpoint(tmp_path / "m", vae_path=tmp_path / "tokenizer-f8ch16")
    assert model.image_tokenizer.config.z_channels == SMALL.latent_channels
    small_release(tmp_path / "other")  # another release model's directory: its vae/ folder is used
    model = load_release_checkpoint(tmp_path / "m", vae_path=tmp_path / "other")
    assert model.image_tokenizer.config.z_channels == SMALL.latent_channels


@pytest.mark.parametrize("change, match", [
    ({"boi": 5}, "boi is 5 in the model config but the tokenizer gives <\\|begin_of_image\\|> the id"),
    ({"use_gen_pos_embed": True}, "use_gen_pos_embed must be false"),
    ({"latent_channels": 16}, "latent_channels in the model config is 16 but the VAE config has z_channels=4"),
    ({"hidden_act": "gelu"}, "hidden_act must be 'silu'"),
    ({"mlp_bias": True}, "mlp_bias must be false"),
    ({"tie_word_embeddings": "false"}, "'tie_word_embeddings' must be true or false, found str 'false'"),
    ({"use_gen_pos_embed": "false"}, "'use_gen_pos_embed' must be true or false, found str 'false'"),
    ({"attention_bias": 1}, "'attention_bias' must be true or false, found 1"),
    ({"fm_head_dim": "wide"}, "fm_head_dim in the model config must be an integer, found str 'wide'"),
    ({"latent_patch_size": 1.5}, "latent_patch_size in the model config must be an integer, found float 1.5"),
    ({"boi": "x"}, "boi in the model config must be an integer id, found str 'x'"),
])
def test_unsupported_or_inconsistent_configs_are_refused(tmp_path, change, match):
    small_release(tmp_path / "m", **change)
    with pytest.raises(ValueError, match=match):
        NextStep.from_pretrained(tmp_path / "m")


def test_a_plain_qwen_directory_points_to_initialisation(tmp_path):
    write_qwen_checkpoint(tmp_path / "qwen", vocab_size=300, vocabulary="small")
    with pytest.raises(ValueError, match="nextstep_from_qwen"):
        NextStep.from_pretrained(tmp_path / "qwen")


def test_code_in_the_release_directory_is_never_run(tmp_path, monkeypatch):
    directory = tmp_path / "m"
    small_release(directory)
    marker = tmp_path / "executed"
    for module in ("configuration_nextstep", "modeling_nextstep"):
        (directory / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    monkeypatch.setattr("builtins.input", lambda *args, **kwargs: "y")
    NextStep.from_pretrained(directory)
    assert not marker.exists()


def test_unknown_config_fields_are_named_in_a_warning(tmp_path):
    small_release(tmp_path / "m", rope_flavour="new")
    with pytest.warns(UserWarning, match="rope_flavour"):
        NextStep.from_pretrained(tmp_path / "m")


def test_tokenizer_config_lists_each_special_token_once_whatever_its_form():
    from nextstep.interop.release_tokenizer import release_tokenizer_config, with_nextstep_tokens

    area = {"content": "<|image_area|>", "special": True}
    config = release_tokenizer_config({"additional_special_tokens": [area],
                                       "extra_special_tokens": ["<|image_area|>", "<|begin_of_image|>",
                                                                "<|begin_of_image|>"]})
    assert config["additional_special_tokens"] == [area, "<|begin_of_image|>"]
    assert "extra_special_tokens" not in config
    config = with_nextstep_tokens({"additional_special_tokens": [area]},
                                  {"<|image_area|>": 1, "<|begin_of_image|>": 2, "[PAD]": 0})
    assert config["additional_special_tokens"] == [area, "<|begin_of_image|>"] and config["pad_token"] == "[PAD]"


# ------------------------------------------- release defaults, derived keys, shard sizes
def test_older_checkpoints_with_rotary_frequencies_load_the_same_model(tmp_path):
    """Checkpoints saved by older Hugging Face code hold ``layers.N.self_attn.rotary_emb.inv_freq``: a tensor
    derived from the config, skipped on loading (with or without the ``model.`` prefix)."""
    tensors = small_release(tmp_path / "plain")
    small_release(tmp_path / "with-inv-freq")
    head_dim = SMALL.hidden_size // SMALL.num_heads
    inv_freq = 1.0 / SMALL.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    added = ["layers.0.self_attn.rotary_emb.inv_freq", "model.layers.1.self_attn.rotary_emb.inv_freq"]
    directory = tmp_path / "with-inv-freq"
    _rewrite_shard_holding(directory, "layers.0.self_attn.q_proj.weight",
                           lambda state: state.update({name: inv_freq.clone() for name in added}))
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"].update(dict.fromkeys(added, index["weight_map"]["layers.0.self_attn.q_proj.weight"]))
    index_path.write_text(json.dumps(index))
    assert {name for name in read_shards(directory)} == set(tensors) | set(added)
    assert all(release_key_to_model_key(name) is None for name in added)
    expected = NextStep.from_pretrained(tmp_path / "plain").state_dict()
    found = NextStep.from_pretrained(directory).state_dict()
    assert found.keys() == expected.keys()
    assert all(torch.equal(found[key], expected[key]) for key in expected)


def test_shards_written_in_another_dtype_are_sized_in_that_dtype(tmp_path):
    """A bfloat16 model written as float32 plans its shards (and the index's total_size) with 4 bytes a value."""
    small_release(tmp_path / "bf16", dtype=torch.bfloat16)
    model = NextStep.from_pretrained(tmp_path / "bf16")
    assert model.backbone.embed_tokens.weight.dtype == torch.bfloat16
    limit = 64 * 1024
    save_release_checkpoint(model, tmp_path / "f32", dtype=torch.float32, max_shard_size=limit)
    written = read_shards(tmp_path / "f32")
    assert {t.dtype for t in written.values()} == {torch.float32}
    index = json.loads((tmp_path / "f32" / "model.safetensors.index.json").read_text())
    nbytes = {name: t.numel() * t.element_size() for name, t in written.items()}
    assert index["metadata"]["total_size"] == sum(nbytes.values())
    by_shard: dict[str, list[str]] = {}
    for name, file in index["weight_map"].items():
        by_shard.setdefault(file, []).append(name)
    assert len(by_shard) >= sum(nbytes.values()) // limit
    for file, names in by_shard.items():
        assert len(names) == 1 or sum(nbytes[name] for name in names) <= limit, file


def test_a_config_without_tie_word_embeddings_loads_an_untied_lm_head(tmp_path):
    """``tie_word_embeddings`` left out means untied (Hugging Face's and the release's default for it): the LM
    head is the shards' ``lm_head.weight``."""
    tensors = small_release(tmp_path / "m", tie_word_embeddings=None)
    assert "tie_word_embeddings" not in json.loads((tmp_path / "m" / "config.json").read_text())
    model = NextStep.from_pretrained(tmp_path / "m")
    assert not model.config.tie_word_embeddings and not model.lm_head.tied
    assert torch.equal(model.lm_head.output_weight(), tensors["lm_head.weight"])
    assert not torch.equal(model.lm_head.output_weight(), model.backbone.embed_tokens.weight)


def _published_default(field: str, release: dict):
    """The setting a release config without ``field`` loads with."""
    from nextstep.interop.release_config import (
        check_release_config,
        head_config_from_release,
        model_config_from_release,
    )
    from nextstep.tokenizers import FluxVAEConfig

    head = head_config_from_release(release)
    if field == "latent_channels":
        return head.token_dim  # 16 channels x the 1x1 patches of the config below
    if field == "use_gen_pos_embed":
        check_release_config(release)  # refused only when true
        return False
    vae = FluxVAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, z_channels=SMALL.latent_channels)
    config = model_config_from_release(release, vae, "")
    return {"fm_head_batch_mul": head.batch_mul, "fm_head_dim": head.width, "fm_head_layers": head.depth,
            "latent_patch_size": config.image_tokenizer.config.patch_size,
            "lm_loss_weight": config.text_loss_weight, "im_loss_weight": config.image_loss_weight}[field]


# NEXTSTEP1_REFERENCE.md: the released head is "base 12 x 1536", each target repeated 4 times (batch_mul 4),
# 16 latent channels grouped 2x2 into tokens, loss weights LM 0.01 and image 1.0, no 2-D position table.
@pytest.mark.parametrize("field, published", [
    ("fm_head_batch_mul", 4), ("fm_head_dim", 1536), ("fm_head_layers", 12), ("latent_channels", 16),
    ("latent_patch_size", 2), ("lm_loss_weight", 0.01), ("im_loss_weight", 1.0), ("use_gen_pos_embed", False),
])
def test_nextstep_fields_left_out_of_a_release_config_take_the_published_values(field, published):
    from interop_synthetic import release_config

    ids = {**RELEASE_IDS, "<|endoftext|>": 151643}
    # Every field set away from its default first, then the one under test left out.
    changed = {"fm_head_batch_mul": 2, "lm_loss_weight": 0.5, "im_loss_weight": 0.5, "latent_patch_size": 1,
               "use_gen_pos_embed": False}
    release = release_config(SMALL, ids, **{**changed, field: None})
    assert field not in release
    assert _published_default(field, release) == published
    if field != "use_gen_pos_embed":  # given, the field is read
        assert _published_default(field, release_config(SMALL, ids, **changed)) != published


def test_shard_sizes_in_decimal_and_binary_units():
    """KB, MB and GB are powers of 1000 (as Hugging Face's max_shard_size reads them); KiB, MiB, GiB of 1024."""
    from nextstep.interop.convert import parse_size

    assert [parse_size(f"3{unit}") for unit in ("KB", "MB", "GB")] == [3_000, 3_000_000, 3_000_000_000]
    assert [parse_size(f"3{unit}") for unit in ("KiB", "MiB", "GiB")] == [3 * 1024, 3 * 1024**2, 3 * 1024**3]
    assert parse_size("100kb") == 100_000 and parse_size("7") == parse_size("7B") == 7
