"""Rarely taken paths of the components: argument and shape checks of the backbones and their caches,
buffer rebuilding of the transformers adapter, checkpoint discovery and meta-device allocation of the
weight loader, the refusals of the VAE checkpoint readers and the release config writer, and the small
checks and descriptions of the samplers, heads, text sampling and tokenizers."""

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from test_backbone_hf_adapter import FIELDS, hf_adapter
from test_vae_checkpoints import TINY, bfl_file, tiny_vae
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM

from nextstep.backbones import HFBackbone, HFBackboneConfig, HFCache, KVCache
from nextstep.backbones.base import Backbone, check_token_ids
from nextstep.config import ComponentSpec
from nextstep.dtypes import check_input_dtype
from nextstep.heads.lm_head import LMHead
from nextstep.interop.release_config import (
    check_special_token_ids,
    read_release_config,
    release_config_from_model,
    release_sampler,
)
from nextstep.presets import tiny
from nextstep.samplers.euler import EulerSamplerConfig
from nextstep.samplers.step_schedule import ConstantSteps, StepSchedule
from nextstep.text_sampling import kept_log_weights
from nextstep.tokenizers import standardize_channels
from nextstep.tokenizers.byte_text import ByteTextTokenizer
from nextstep.tokenizers.vae_checkpoints import (
    bfl_to_diffusers,
    config_from_diffusers,
    detect_layout,
    diffusers_to_bfl,
    load_flux_vae,
    read_torch_checkpoint,
    save_flux_vae_state,
)
from nextstep.weights import checkpoint_shards, load_safetensors

# ----------------------------------------------------------------------------- the transformers adapter


def test_an_adapter_cache_without_rows_or_slots_names_both_sizes():
    with pytest.raises(ValueError, match="batch_size and max_length must be >= 1, found 0 and 4"):
        hf_adapter().new_cache(0, 4)


def test_an_adapter_cache_refuses_a_mask_of_another_batch_and_claims_nothing():
    cache = hf_adapter().new_cache(2, 4)
    with pytest.raises(ValueError, match="batch of 1 rows does not match the cache's 2 rows"):
        cache.reserve(torch.ones(1, 3, dtype=torch.bool), 3)
    assert not cache.key_mask.any() and cache.length == 0


class _WholeCache:
    """A transformers 4.x style cache: no ``layers``, one ``crop`` for all of them."""

    def __init__(self, filled):
        self.filled, self.crops = filled, []

    def get_seq_length(self):
        return self.filled

    def crop(self, length):
        self.crops.append(length)
        self.filled = length


@pytest.mark.parametrize("filled, crops", [(3, [1]), (1, [])])
def test_an_adapter_cache_without_layers_crops_all_of_them_to_the_filled_slots(filled, crops):
    hf_cache = _WholeCache(filled)
    cache = HFCache(hf_cache, 1, 4, empty=_WholeCache(0))
    cache.commit(1)
    cache.forget_unfilled()
    assert hf_cache.crops == crops and hf_cache.filled == 1


def test_an_adapter_needs_a_config_or_a_model():
    with pytest.raises(ValueError, match="HFBackbone needs an HFBackboneConfig or a model"):
        HFBackbone()


def test_an_adapter_given_a_model_and_a_config_keeps_that_config():
    model = hf_adapter().model
    config = HFBackboneConfig(model_config={**FIELDS, "vocab_size": 90})
    assert HFBackbone(config, model=model).config is config


def _save_causal_lm(directory):
    torch.manual_seed(1)
    reference = Qwen2ForCausalLM(Qwen2Config(**{k: v for k, v in FIELDS.items() if k != "model_type"}))
    reference.save_pretrained(str(directory))
    return reference


def test_an_adapter_built_on_the_meta_device_reads_the_architecture_of_its_directory(tmp_path):
    _save_causal_lm(tmp_path)
    with torch.device("meta"):
        adapter = HFBackbone(HFBackboneConfig(path=str(tmp_path)))
    assert all(parameter.is_meta for parameter in adapter.parameters())
    assert (adapter.hidden_size, adapter.vocab_size, len(adapter.decoder_layers())) == (32, 90, 2)
    assert adapter.config.path == "" and adapter.config.model_config["intermediate_size"] == 48


def test_an_adapter_over_a_directory_model_refuses_a_new_embedding_table(tmp_path):
    reference = _save_causal_lm(tmp_path)
    adapter = HFBackbone(HFBackboneConfig(path=str(tmp_path)), model=reference)
    with pytest.raises(ValueError, match=f"loaded from '{tmp_path}' keeps that checkpoint's size"):
        adapter.set_input_embeddings(nn.Embedding(100, 32))
    assert adapter.vocab_size == 90


def test_meta_buffers_of_a_module_with_parameters_are_not_rebuilt():
    adapter = hf_adapter()
    adapter.model.norm.register_buffer("scale", torch.empty(2, device="meta"))
    with pytest.raises(ValueError, match="cannot rebuild the meta buffers of 'norm': it also holds parameters"):
        adapter.reset_buffers()


class _Holder(nn.Module):
    """A parameter-free module that the model config cannot build."""

    def __init__(self, device=None, dtype=torch.float32):
        super().__init__()
        self.register_buffer("inv_freq", torch.ones(3, device=device, dtype=dtype), persistent=False)


def test_meta_buffers_of_a_module_the_config_cannot_build_name_that_module():
    adapter = hf_adapter()
    adapter.model.extra = _Holder(device="meta")
    with pytest.raises(ValueError, match=r"cannot rebuild the meta buffers of 'extra' \(_Holder\) from the model "
                                         r"config: .*config"):
        adapter.reset_buffers()


def test_a_cast_leaves_frequency_buffers_that_cannot_be_rebuilt_as_they_are():
    adapter = hf_adapter()
    adapter.model.norm.register_buffer("inv_freq_copy", torch.ones(2))
    adapter.model.extra = _Holder()
    adapter.to(torch.float64)
    assert adapter.model.norm.inv_freq_copy.dtype == torch.float64
    assert adapter.model.extra.inv_freq.dtype == torch.float64
    assert adapter.model.rotary_emb.inv_freq.dtype == torch.float32


@pytest.mark.parametrize("embeds, positions, mask, message", [
    ((1, 3, 31), (1, 3), None, r"embeds must have shape \(B, L, 32\), found \(1, 3, 31\)"),
    ((1, 3), (1, 3), None, r"embeds must have shape \(B, L, 32\), found \(1, 3\)"),
    ((1, 3, 32), (1, 4), None, r"positions must have shape \(1, 3\), found \(1, 4\)"),
    ((1, 3, 32), (1, 3), (2, 3), r"attention_mask must have shape \(1, 3\), found \(2, 3\)"),
])
def test_an_adapter_names_the_shape_it_expected_and_found(embeds, positions, mask, message):
    adapter = hf_adapter()
    mask = None if mask is None else torch.ones(mask, dtype=torch.bool)
    with pytest.raises(ValueError, match=message):
        adapter(torch.zeros(embeds), torch.zeros(positions, dtype=torch.long), mask)


# ----------------------------------------------------------------------------- the backbone interface


def test_a_static_cache_refuses_an_empty_or_nested_row_index():
    cache = KVCache(1, 2, 4, 1, 2)
    with pytest.raises(ValueError, match=r"rows must be a non-empty 1-D index, found shape \(0,\)"):
        cache.select_rows(torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match=r"rows must be a non-empty 1-D index, found shape \(1, 2\)"):
        cache.select_rows([[0, 1]])


def test_a_static_cache_reports_its_device_and_takes_a_length():
    cache = KVCache(1, 2, 4, 1, 2, device="meta")
    assert cache.device == torch.device("meta")
    cache.length = 3
    assert cache.length == 3 and cache.reserve(None, 1) == (3, 4)


@pytest.mark.parametrize("mask, length, message", [
    (torch.ones(2, 1, 3, dtype=torch.bool), None, r"attention_mask must have shape \(B, L\), found \(2, 1, 3\)"),
    (torch.ones(3, 2, dtype=torch.bool), None, "batch of 3 rows does not match the cache's 2 rows"),
    (None, None, "reserve needs an attention_mask or a length"),
])
def test_a_static_cache_refuses_a_reservation_it_cannot_place(mask, length, message):
    cache = KVCache(1, 2, 4, 1, 2)
    with pytest.raises(ValueError, match=message):
        cache.reserve(mask, length)
    assert cache.length == 0 and not cache.key_mask.any()


class _BareBackbone(Backbone):
    """A backbone with only what the interface requires."""

    hidden_size = 4
    vocab_size = 3

    def embed(self, input_ids):
        return torch.zeros(*input_ids.shape, 4)

    def forward(self, embeds, positions, attention_mask=None, cache=None):
        return embeds

    def new_cache(self, batch_size, max_length, *, device=None, dtype=None):
        return KVCache(1, batch_size, max_length, 1, 4, device=device)


def test_a_backbone_without_an_embedding_table_says_so():
    backbone = _BareBackbone()
    with pytest.raises(NotImplementedError, match="_BareBackbone does not expose its embedding table"):
        backbone.input_embeddings()
    with pytest.raises(NotImplementedError, match="_BareBackbone cannot replace its embedding table"):
        backbone.set_input_embeddings(nn.Embedding(3, 4))


@pytest.mark.parametrize("config", [None, SimpleNamespace(width=4)])
def test_a_backbone_without_a_checkpointing_field_refuses_to_checkpoint(config):
    backbone = _BareBackbone()
    if config is not None:
        backbone.config = config
    with pytest.raises(ValueError, match="backbone _BareBackbone has no 'gradient_checkpointing' config field"):
        backbone.set_gradient_checkpointing(True)


def test_token_ids_are_checked_only_when_there_are_some_on_the_cpu():
    assert check_token_ids(torch.zeros(0, dtype=torch.long), 3) is None
    assert check_token_ids(torch.full((1, 2), 7, device="meta"), 3) is None
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 3\) .* found ids from 0 to 7"):
        check_token_ids(torch.tensor([[0, 7]]), 3)


# ----------------------------------------------------------------------------- checkpoint files


def test_a_directory_with_one_index_of_its_own_name_reads_the_shards_it_lists(tmp_path):
    save_file({"a": torch.ones(1)}, str(tmp_path / "listed.safetensors"))
    save_file({"b": torch.ones(1)}, str(tmp_path / "stray.safetensors"))
    (tmp_path / "custom.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "listed.safetensors"}}))
    assert checkpoint_shards(tmp_path) == [tmp_path / "listed.safetensors"]


def test_a_file_that_is_no_checkpoint_is_named(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(FileNotFoundError, match=r"expected a \.safetensors file, an index \.json or a checkpoint "
                                                r"directory at .*weights\.bin, found nothing usable"):
        checkpoint_shards(tmp_path / "weights.bin")


@pytest.mark.parametrize("text, error", [("{not json", "JSONDecodeError"), ('{"weights": {}}', "KeyError"),
                                         ("[1]", "TypeError")])
def test_an_index_without_a_weight_map_is_named_with_the_reason(tmp_path, text, error):
    (tmp_path / "model.safetensors.index.json").write_text(text)
    with pytest.raises(ValueError, match=f"model.safetensors.index.json is not a safetensors index with a "
                                         f"'weight_map' \\({error}"):
        checkpoint_shards(tmp_path)


class _TiedBuffers(nn.Module):
    def __init__(self):
        super().__init__()
        shared = torch.zeros(2)
        self.first, self.second = nn.Module(), nn.Module()
        self.first.register_buffer("table", shared)
        self.second.register_buffer("table", shared)


def test_a_buffer_shared_by_two_modules_stays_shared_when_loaded_from_the_meta_device(tmp_path):
    save_file({"first.table": torch.tensor([1.0, 2.0]), "second.table": torch.tensor([1.0, 2.0])},
              str(tmp_path / "model.safetensors"))
    with torch.device("meta"):
        module = _TiedBuffers()
    load_safetensors(module, tmp_path)
    assert module.first.table is module.second.table
    assert module.first.table.tolist() == [1.0, 2.0]


class _ForgetfulRebuilder(nn.Module):
    """Its child's derived buffer is its to rebuild, which it forgets."""

    def __init__(self):
        super().__init__()
        self.child = nn.Module()
        self.child.register_buffer("derived", torch.zeros(2), persistent=False)

    def reset_buffers(self):
        pass


def test_a_meta_buffer_that_reset_buffers_leaves_on_the_meta_device_is_named(tmp_path):
    save_file({"unused": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with torch.device("meta"):
        module = nn.Sequential(_ForgetfulRebuilder())
    with pytest.raises(ValueError, match=r"buffers \['0.child.derived'\] are still on the meta device after "
                                         r"reset_buffers\(\)"):
        load_safetensors(module, tmp_path, strict=False)


# ----------------------------------------------------------------------------- VAE checkpoints


@pytest.mark.parametrize("convert, key, source", [
    (diffusers_to_bfl, "post.weight", "a diffusers AutoencoderKL checkpoint"),
    (diffusers_to_bfl, "encoder.extra.weight", "a diffusers AutoencoderKL checkpoint"),
    (bfl_to_diffusers, "decoder.extra.weight", r"a FLUX \(BFL\) autoencoder state dict"),
])
def test_a_key_of_no_known_block_is_named_with_its_layout(convert, key, source):
    with pytest.raises(ValueError, match=f"unexpected key '{key}' in {source}"):
        convert({"encoder.conv_in.weight": torch.zeros(1), key: torch.zeros(1)}, 3)


def test_a_diffusers_checkpoint_with_quantisation_convolutions_is_refused():
    state = {"encoder.conv_in.weight": torch.zeros(1), "quant_conv.weight": torch.zeros(1),
             "post_quant_conv.bias": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"checkpoint has \['post_quant_conv.bias', 'quant_conv.weight'\]: VAEs "
                                         "with quant_conv/post_quant_conv are not FLUX-shaped"):
        diffusers_to_bfl(state, 3)


@pytest.mark.parametrize("fields, message", [
    ({"block_out_channels": [16, 24]}, r"block_out_channels \[16, 24\] are not multiples of the first width"),
    ({"block_out_channels": [16, 32]}, "diffusers config enables quant_conv/post_quant_conv"),
    ({"block_out_channels": [16, 32], "use_quant_conv": False}, "diffusers config enables quant_conv"),
])
def test_a_diffusers_config_that_is_not_flux_shaped_is_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        config_from_diffusers(fields)


def test_a_torch_checkpoint_that_is_absent_or_truncated_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"expected a checkpoint at .*absent\.pt, found nothing"):
        read_torch_checkpoint(tmp_path / "absent.pt")
    torch.save({"w": torch.ones(3)}, tmp_path / "whole.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:50])
    with pytest.raises(ValueError, match=r"cut\.pt is not a readable torch checkpoint \(.*zip archive"):
        read_torch_checkpoint(tmp_path / "cut.pt")


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "module"])
def test_a_torch_checkpoint_wrapping_its_state_dict_gives_the_state_dict(tmp_path, wrapper):
    torch.save({wrapper: {"w": torch.arange(3.0)}, "epoch": 4}, tmp_path / "wrapped.pt")
    state = read_torch_checkpoint(tmp_path / "wrapped.pt")
    assert list(state) == ["w"] and state["w"].tolist() == [0.0, 1.0, 2.0]


@pytest.mark.parametrize(("data", "found"), [([torch.ones(1)], "found a list"),
                                             ({"w": torch.ones(1), "step": 3}, "'step' is a int")])
def test_a_torch_checkpoint_of_other_things_than_tensors_is_refused(tmp_path, data, found):
    torch.save(data, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=rf"other\.pt does not hold a state dict of tensors: {found}"):
        read_torch_checkpoint(tmp_path / "other.pt")


def test_layout_detection_reads_a_pickle_file_and_a_directory_with_an_unreadable_config(tmp_path):
    torch.save({"w": torch.ones(1)}, tmp_path / "weights.ckpt")
    assert detect_layout(tmp_path / "weights.ckpt") == "nextstep"
    (tmp_path / "bfl").mkdir()
    (tmp_path / "bfl" / "config.json").write_text("{not json")
    bfl_file(tiny_vae(), tmp_path / "bfl" / "ae.safetensors")
    assert detect_layout(tmp_path / "bfl") == "bfl"


def test_a_directory_of_no_vae_layout_names_the_layouts(tmp_path):
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(FileNotFoundError, match="is not a VAE checkpoint: expected a FLUX 'ae.safetensors' file, a "
                                                "diffusers directory"):
        detect_layout(tmp_path)


def test_an_unknown_vae_layout_is_named_when_loading_and_saving(tmp_path):
    bfl_file(tiny_vae(), tmp_path / "ae.safetensors")
    known = r"known: \['bfl', 'diffusers', 'nextstep', 'native'\]"
    with pytest.raises(ValueError, match=f"unknown VAE layout 'ckpt'; {known}"):
        load_flux_vae(tmp_path / "ae.safetensors", layout="ckpt")
    with pytest.raises(ValueError, match=f"unknown VAE layout 'ckpt'; {known}"):
        save_flux_vae_state(tiny_vae().state_dict(), TINY, tmp_path / "out", layout="ckpt")
    assert not (tmp_path / "out").exists()


def test_a_bfl_file_loaded_with_its_own_normalization_keeps_it(tmp_path):
    bfl_file(tiny_vae(), tmp_path / "ae.safetensors")
    loaded = load_flux_vae(tmp_path / "ae.safetensors", norm_groups=8, normalization="none")
    assert (loaded.config.normalization, loaded.config.scaling_factor, loaded.config.shift_factor) == ("none", 1.0, 0.0)


def test_keeping_the_dtype_of_a_checkpoint_that_mixes_dtypes_gives_float32(tmp_path):
    state = {key: tensor.to(torch.bfloat16 if index % 2 else torch.float16).contiguous()
             for index, (key, tensor) in enumerate(tiny_vae().state_dict().items())}
    save_file(state, str(tmp_path / "ae.safetensors"))
    loaded = load_flux_vae(tmp_path / "ae.safetensors", norm_groups=8, keep_dtype=True)
    assert {parameter.dtype for parameter in loaded.parameters()} == {torch.float32}


# ----------------------------------------------------------------------------- the release config


def test_a_config_of_another_model_type_is_not_read_as_a_release(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(ValueError, match="config.json has model_type 'qwen2'; a NextStep release config has "
                                         "model_type 'nextstep'"):
        read_release_config(tmp_path)


class _SpecialIds:
    def __init__(self, ids):
        self.ids = ids

    def special_token_id(self, token):
        return self.ids[token]


def test_special_token_ids_the_release_leaves_out_are_not_checked():
    from nextstep.interop.release_config import END_OF_IMAGE

    assert check_special_token_ids({"eoi": 7}, _SpecialIds({END_OF_IMAGE: 7})) is None
    with pytest.raises(ValueError, match="eoi is 7 in the model config but the tokenizer gives .* the id 8"):
        check_special_token_ids({"eoi": 7}, _SpecialIds({END_OF_IMAGE: 8}))


def test_a_sampler_spec_is_the_release_sampler_and_anything_else_is_refused():
    spec = ComponentSpec("sampler", "euler", EulerSamplerConfig())
    assert release_sampler(spec) is spec
    with pytest.raises(ValueError, match="sampler must be a ComponentSpec, a registered sampler's name or None, "
                                         "found int"):
        release_sampler(3)


def _release_shaped(**vae_changes):
    """The tiny preset with the VAE group count the release layout has."""
    config = tiny()
    vae = config.image_tokenizer.config.replace(norm_groups=32, **vae_changes)
    return config.replace(image_tokenizer=ComponentSpec("image_tokenizer", "flux_vae", vae))


def test_a_model_of_another_backbone_is_not_written_as_a_release():
    backbone = ComponentSpec("backbone", "huggingface", HFBackboneConfig(model_config=FIELDS))
    config = _release_shaped().replace(backbone=backbone)
    with pytest.raises(ValueError, match="the release layout stores a 'qwen2' backbone, found 'huggingface'; save "
                                         "this model with save_pretrained instead"):
        release_config_from_model(config, None)


def test_a_vae_whose_decoder_is_wider_is_not_written_as_a_release():
    with pytest.raises(ValueError, match=r"image_tokenizer.decoder_ch must equal ch \(32\) .*found decoder_ch 64 "
                                         "and decoder_norm_groups 32"):
        release_config_from_model(_release_shaped(decoder_ch=64, decoder_norm_groups=32), None)


def test_a_head_whose_tokens_are_not_the_latent_patches_is_not_written_as_a_release():
    config = _release_shaped()
    head = config.image_head.config.replace(token_dim=32)
    config = config.replace(image_head=ComponentSpec("image_head", "flow_matching", head))
    with pytest.raises(ValueError, match=r"image_head.token_dim 32 differs from z_channels \* patch_size\*\*2 = 64"):
        release_config_from_model(config, None)


# ----------------------------------------------------------------------------- small checks and descriptions


def test_inputs_of_another_dtype_are_accepted_under_autocast_only():
    inputs = torch.zeros(2, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert check_input_dtype(inputs, torch.float32, "latents", "the VAE") is None
    with pytest.raises(ValueError, match="latents are torch.bfloat16 but the VAE weights torch.float32"):
        check_input_dtype(inputs, torch.float32, "latents", "the VAE")


class _Growing(StepSchedule):
    def steps_for(self, index, count):
        return (index * 7) % count + 1


def test_a_step_schedule_takes_the_most_steps_any_token_gets_and_a_constant_one_names_its_count():
    assert _Growing().max_steps(5) == 5 and _Growing().max_steps(1) == 1
    assert repr(ConstantSteps(3)) == "ConstantSteps(3)"


def test_an_lm_head_describes_its_sizes_and_tying():
    assert LMHead(4, 9).extra_repr() == "4 -> 9, tied=False"
    assert LMHead(4, 9, nn.Embedding(9, 4)).extra_repr() == "4 -> 9, tied=True"


def test_latents_that_do_not_tile_into_normalisation_patches_are_refused():
    with pytest.raises(ValueError, match="latent size must be a multiple of the normalisation patch 2, found 3x4"):
        standardize_channels(torch.zeros(1, 4, 3, 4), 2)


@pytest.mark.parametrize("logits, temperature, message", [
    (torch.zeros(3), 1.0, r"logits must have shape \(R, V\), found \(3,\)"),
    (torch.zeros(1, 3), 0.0, "kept_log_weights needs temperature > 0, found 0.0"),
    (torch.zeros(1, 3), float("nan"), "kept_log_weights needs temperature > 0, found nan"),
])
def test_text_sampling_weights_refuse_logits_without_rows_and_a_temperature_not_above_zero(logits, temperature,
                                                                                           message):
    with pytest.raises(ValueError, match=message):
        kept_log_weights(logits, temperature=temperature)


def test_the_byte_tokenizer_encodes_only_strings():
    with pytest.raises(TypeError, match="text must be a str, found bytes"):
        ByteTextTokenizer().encode(b"abc")
