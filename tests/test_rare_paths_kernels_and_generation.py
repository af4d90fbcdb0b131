"""Rarely taken paths of generation and the kernels: the refusals of image and text generation, of the model,
its sequences and tokenizers, of the Qwen and release interop, of the word vectors and the fast path's
weights, the descriptions of guidance and compiled functions, and the argument checks of the Triton kernels."""

import importlib

import pytest
import torch
from interop_synthetic import write_qwen_checkpoint
from test_hf_text_tokenizer import save_tokenizer
from test_interop_qwen_init import tiny_vae

from nextstep.backbones.qwen2 import Qwen2Backbone
from nextstep.backbones.qwen2_checkpoint import qwen2_config_from_hf
from nextstep.compile import DISABLE_VARIABLE, safe_compile
from nextstep.evaluation.shapes_geneval import geneval_entry
from nextstep.fast.guidance_weights import branch_weights
from nextstep.fast.packed_projections import pack_projections
from nextstep.generation import generate_tokens
from nextstep.heads.flow_matching import FlowMatchingMLP
from nextstep.interop import initialize_rows_from_mean, nextstep_from_qwen, save_release_checkpoint
from nextstep.interop.qwen_init import row_statistics
from nextstep.interop.release_checkpoint import find_release_vae, model_key_to_release_key
from nextstep.kernels import (
    add_rms_norm_triton,
    gated_linear_triton,
    guided_update_triton,
    layer_norm_modulate_triton,
    modulated_linear_triton,
    rotate_into_cache_triton,
    skinny_linear_triton,
    swiglu_triton,
)
from nextstep.layers.word_vectors import WordVectorConfig, WordVectorInput
from nextstep.presets import flow_head_config
from nextstep.samplers.editing_guidance import ImageEditingGuidance
from nextstep.samplers.guidance import Guidance
from nextstep.text_generation import generate_text
from nextstep.tokenizers import HFTextTokenizer, HFTextTokenizerConfig
from nextstep.tokenizers.decoder_widening import _embed
from nextstep.tokenizers.hf_text import BYTE_LEVEL_ALPHABET
from nextstep.tokenizers.word_text import WordTextTokenizer

# ----------------------------------------------------------------------------- image and text generation


class _FourBranches(Guidance):
    num_branches = 4

    def combine(self, predictions, t=None, progress=0.0):
        return predictions[0]


def test_generation_refuses_a_sampler_that_is_neither_a_sampler_nor_a_name(tiny_model):
    with pytest.raises(ValueError, match="sampler must be a Sampler or a registered name, found int"):
        generate_tokens(tiny_model, "a", height=16, width=16, num_steps=1, sampler=3)


@pytest.mark.parametrize("editing, message", [
    (False, "text-to-image supports guidance with 1 or 2 branches, found 4"),
    (True, "editing supports guidance with 1 to 3 branches, found 4"),
])
def test_generation_names_the_branches_its_guidance_needs(tiny_model, editing, message):
    images = torch.zeros(1, 3, 16, 16) if editing else None
    with pytest.raises(ValueError, match=message):
        generate_tokens(tiny_model, "a", images=images, height=None if editing else 16, width=None if editing else 16,
                        num_steps=1, cfg=_FourBranches())


def test_text_generation_refuses_an_empty_prompt_row(tiny_model):
    with pytest.raises(ValueError, match="every prompt row needs at least one id, found an empty one"):
        generate_text(tiny_model, [([], [])], max_new_tokens=1)


def test_text_generation_names_a_span_that_is_not_a_pair(tiny_model):
    ids = tiny_model.text_tokenizer.encode("a")
    with pytest.raises(ValueError, match=r"prompt row 0: a span must be a pair \(start, tokens\), found \(1,\)"):
        generate_text(tiny_model, [(ids, [(1,)])], max_new_tokens=1)


# ----------------------------------------------------------------------------- the model and its sequences


def test_the_model_names_the_draw_rows_it_lacks(tiny_model):
    ids = torch.full((2, 3), tiny_model.text_tokenizer.encode("a")[0])
    mask = torch.zeros(2, 3, dtype=torch.bool)
    tokens = torch.zeros(2, 3, tiny_model.token_dim)
    with pytest.raises(ValueError, match=r"draw_rows must use every index from 0 to 1, found \[1, 1\]"):
        tiny_model.embed(ids, mask, tokens, draw_rows=torch.tensor([1, 1]))


def test_a_model_without_a_text_tokenizer_says_to_pass_one(tiny_model):
    tiny_model.text_tokenizer = None
    with pytest.raises(ValueError, match="this model was built without a text tokenizer; pass one to NextStep"):
        tiny_model.sequences


def test_parsing_a_sequence_whose_area_is_not_height_by_width_names_what_it_found(tiny_model):
    tok = tiny_model.text_tokenizer
    ids = tok.encode("a") + [tok.image_area_id] + tok.encode("x9") + [tok.begin_of_image_id]
    with pytest.raises(ValueError, match=r"expected '\{h\}\*\{w\}' after <\|image_area\|>, found 'x9'"):
        tiny_model.sequences.parse(ids)


def test_left_padding_refuses_no_sequences_and_keeps_an_empty_one_all_padding(tiny_model):
    builder, pad = tiny_model.sequences, tiny_model.text_tokenizer.pad_id
    with pytest.raises(ValueError, match="cannot pad an empty list of sequences"):
        builder.left_pad([])
    input_ids, mask = builder.left_pad([[], [7, 8]])
    assert input_ids.tolist() == [[pad, pad], [7, 8]]
    assert mask.tolist() == [[False, False], [True, True]]


# ----------------------------------------------------------------------------- descriptions


def test_editing_guidance_describes_all_its_settings():
    guidance = ImageEditingGuidance(3.0, 1.5, interval=(0.1, 0.9), renorm=1.0)
    assert repr(guidance) == "ImageEditingGuidance(3.0, 1.5, schedule='constant', interval=(0.1, 0.9), renorm=1.0)"


def test_a_compiled_function_describes_whether_it_runs_compiled(monkeypatch):
    def double(x):
        return 2 * x

    assert repr(safe_compile(double, name="double")) == "SafeCompiled(double, compiled)"
    monkeypatch.setenv(DISABLE_VARIABLE, "1")
    assert repr(safe_compile(double, name="double")) == f"SafeCompiled(double, eager ({DISABLE_VARIABLE} is set))"


# ----------------------------------------------------------------------------- tokenizers


def test_a_hugging_face_tokenizer_needs_a_path_that_is_a_directory(tmp_path):
    with pytest.raises(ValueError, match="HFTextTokenizerConfig.path must name a local tokenizer directory, found ''"):
        HFTextTokenizer(HFTextTokenizerConfig())
    with pytest.raises(FileNotFoundError, match="expected a Hugging Face tokenizer directory at '.*absent', found"):
        HFTextTokenizer(HFTextTokenizerConfig(path=str(tmp_path / "absent")))


def test_a_hugging_face_tokenizer_encodes_only_strings(hf_tokenizer_dir):
    with pytest.raises(TypeError, match="text must be a str, found bytes"):
        HFTextTokenizer(HFTextTokenizerConfig(path=str(hf_tokenizer_dir))).encode(b"a")


def test_a_vocabulary_without_a_byte_level_decoder_has_no_byte_ids_or_token_bytes(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {character: value for value, character in BYTE_LEVEL_ALPHABET.items()}
    bpe = Tokenizer(models.BPE(vocab, []))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer = save_tokenizer(bpe, tmp_path)
    assert tokenizer.byte_id(ord("a")) is None and tokenizer.token_bytes(vocab["a"]) is None


def test_a_byte_level_token_spelled_outside_the_byte_alphabet_has_no_bytes(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {character: value for value, character in BYTE_LEVEL_ALPHABET.items()}
    bpe = Tokenizer(models.BPE({**vocab, "Ġa": 256, "日": 257}, []))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tokenizer = save_tokenizer(bpe, tmp_path)
    assert tokenizer.token_bytes(256) == b" a" and tokenizer.token_bytes(257) is None


def test_counting_pieces_refuses_texts_that_are_not_strings():
    with pytest.raises(TypeError, match="texts must be strings, found int"):
        WordTextTokenizer.count_pieces(["a b", 3])


def test_patchifying_latents_that_are_not_four_dimensional_names_their_shape(tiny_model):
    with pytest.raises(ValueError, match=r"latents must have shape \(B, C, H, W\), found \(16, 4, 4\)"):
        tiny_model.image_tokenizer.patchify(torch.zeros(16, 4, 4))


def test_widening_a_tensor_into_a_narrower_one_names_both_shapes():
    with pytest.raises(ValueError, match=r"cannot widen a tensor of shape \(4, 3\) into \(4, 2\)"):
        _embed(torch.zeros(4, 2), torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"cannot widen a tensor of shape \(4,\) into \(4, 4\)"):
        _embed(torch.zeros(4, 4), torch.zeros(4))


def test_word_vectors_refuse_learned_ids_of_another_shape():
    module = WordVectorInput(WordVectorConfig(count=5, dim=2), table_size=3, hidden_size=4)
    with pytest.raises(ValueError, match=r"expected learned_ids of shape \(5,\), found \(2,\)"):
        module.set_vectors(torch.ones(5, 2), torch.zeros(2, dtype=torch.long))


def test_word_vectors_of_no_ids_are_empty():
    module = WordVectorInput(WordVectorConfig(count=5, dim=2), table_size=3, hidden_size=4)
    table, added = module(torch.zeros(2, 0, dtype=torch.long))
    assert table.shape == (2, 0) and added.shape == (2, 0, 4)


# ----------------------------------------------------------------------------- interop


def test_row_statistics_need_a_trained_row():
    with pytest.raises(ValueError, match="need at least one trained row to initialise new ones from, found 0"):
        row_statistics(torch.ones(3, 2), 0)


def test_initialising_no_rows_leaves_the_table_as_it_was():
    weight = torch.arange(6.0).reshape(3, 2)
    initialize_rows_from_mean(weight, [], 0)
    assert weight.tolist() == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]


def rewrite_weights(directory, edit) -> None:
    """Rewrite ``directory/model.safetensors`` after ``edit(tensors)`` changed its name -> tensor dict in place."""
    from safetensors.torch import load_file, save_file

    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_a_qwen_checkpoint_without_its_lm_head_is_named(tmp_path):
    write_qwen_checkpoint(tmp_path, vocab_size=300, num_layers=1, vocabulary="small")
    rewrite_weights(tmp_path, lambda tensors: tensors.pop("lm_head.weight"))
    with pytest.raises(ValueError, match=r"has no LM head weights: expected one of \['lm_head.weight'\]"):
        nextstep_from_qwen(tmp_path, image_tokenizer=tiny_vae(), head="tiny")


def test_a_qwen_lm_head_of_another_width_names_its_shape_and_the_one_expected(tmp_path):
    write_qwen_checkpoint(tmp_path, vocab_size=300, num_layers=1, vocabulary="small")
    rewrite_weights(tmp_path, lambda tensors: tensors.update({"lm_head.weight": torch.zeros(300, 16)}))
    message = r"lm_head.weight in .* has shape \(300, 16\); expected \(300, 32\), the vocab_size and hidden_size"
    with pytest.raises(ValueError, match=message):
        nextstep_from_qwen(tmp_path, image_tokenizer=tiny_vae(), head="tiny")


def test_a_model_from_qwen_takes_a_full_head_config(tmp_path):
    write_qwen_checkpoint(tmp_path, vocab_size=300, num_layers=1, vocabulary="small")
    vae = tiny_vae()
    head = flow_head_config("tiny", 32, vae.token_dim).replace(mlp_ratio=2.0)
    model = nextstep_from_qwen(tmp_path, image_tokenizer=vae, head=head)
    assert model.config.image_head.config == head


def test_a_key_of_no_stored_part_has_no_release_key():
    with pytest.raises(ValueError, match="state-dict key 'optimizer.step' belongs to no part the release layout"):
        model_key_to_release_key("optimizer.step")


def test_a_release_vae_named_by_something_other_than_a_path_is_looked_for_in_vae_only(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"in one of \[{tmp_path / 'vae'}\], found none"):
        find_release_vae(tmp_path, {"vae_name_or_path": 3})


def test_the_release_layout_refuses_a_byte_tokenizer_and_an_image_tokenizer_that_is_not_flux(
        tiny_model, hf_tokenizer_dir, tmp_path):
    with pytest.raises(ValueError, match="stores a Hugging Face tokenizer, found ByteTextTokenizer; save this model"):
        save_release_checkpoint(tiny_model, tmp_path / "release")
    tiny_model.text_tokenizer = HFTextTokenizer(HFTextTokenizerConfig(path=str(hf_tokenizer_dir)))
    tiny_model.image_tokenizer = torch.nn.Identity()
    with pytest.raises(ValueError, match="the release layout stores a FLUX VAE, found Identity"):
        save_release_checkpoint(tiny_model, tmp_path / "release")
    assert not (tmp_path / "release").exists()


def test_a_hugging_face_config_without_a_required_key_names_it():
    with pytest.raises(ValueError,
                       match=r"Hugging Face config.json lacks the required key 'hidden_size' \(found keys \["):
        qwen2_config_from_hf({"model_type": "qwen2", "vocab_size": 8})


def test_a_null_rms_norm_eps_is_qwen2_s_default_and_a_bad_one_is_named():
    fields = {"model_type": "qwen2", "vocab_size": 8, "hidden_size": 8, "num_attention_heads": 2,
              "intermediate_size": 16, "num_hidden_layers": 1}
    assert qwen2_config_from_hf({**fields, "rms_norm_eps": None}).rms_norm_eps == 1e-6
    for bad in ("1e-6", 0, True):
        with pytest.raises(ValueError, match="config field 'rms_norm_eps' must be a positive number, found"):
            qwen2_config_from_hf({**fields, "rms_norm_eps": bad})


def test_an_unknown_geneval_tag_names_the_known_ones():
    with pytest.raises(ValueError, match=r"tag must be one of \['single_object', .*\], found 'three_object'"):
        geneval_entry("three_object", ("circle",))


# ----------------------------------------------------------------------------- the fast path's weights


def test_branch_weights_of_guidance_without_weights_say_why():
    with pytest.raises(ValueError, match="_FourBranches has no branch weights \\(weighted guidance: NoGuidance, "):
        branch_weights(_FourBranches(), torch.tensor([0.5]))


# ----------------------------------------------------------------------------- kernel argument checks

ROWS = torch.zeros(2, 4)


@pytest.mark.parametrize("call, message", [
    (lambda: modulated_linear_triton(torch.zeros(4), ROWS, ROWS, torch.zeros(3, 4), None),
     r"x must have shape \(M, K\), found \(4,\)"),
    (lambda: modulated_linear_triton(ROWS, torch.zeros(2, 3), ROWS, torch.zeros(3, 4), None),
     r"shift must have the shape of x \(2, 4\), found \(2, 3\)"),
    (lambda: modulated_linear_triton(ROWS, ROWS, ROWS, torch.zeros(3, 5), None),
     r"weight must have shape \(N, 4\), found \(3, 5\)"),
    (lambda: modulated_linear_triton(ROWS, ROWS, ROWS, torch.zeros(3, 4), torch.zeros(4)),
     r"weight bias must have shape \(3,\), found \(4,\)"),
    (lambda: gated_linear_triton(torch.zeros(2, 4, 1), torch.zeros(3, 4), None, torch.zeros(2, 3), torch.zeros(2, 3)),
     r"u must have shape \(M, K\), found \(2, 4, 1\)"),
    (lambda: swiglu_triton(torch.zeros(4), torch.zeros(4)), r"gate must have shape \(M, F\), found \(4,\)"),
    (lambda: skinny_linear_triton(torch.zeros(4), torch.zeros(3, 4), None),
     r"x must have shape \(M, K\), found \(4,\)"),
    (lambda: skinny_linear_triton(ROWS, torch.zeros(3, 4), torch.zeros(3, device="meta")),
     "bias must be on cpu like x, found meta"),
    (lambda: guided_update_triton(ROWS, torch.zeros(4), torch.ones(1), torch.zeros(3)),
     r"state must have shape \(R, D\), found \(4,\)"),
])
def test_a_kernel_names_the_argument_of_another_shape_or_device(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def _rotary_arguments(**changes):
    """Arguments of one row, 2 query heads, 1 key/value head of 4 dims, and a 3-slot cache."""
    arguments = dict(qkv=torch.zeros(1, 16), cos=torch.ones(1, 4), signed_sin=torch.zeros(1, 4),
                     keys=torch.zeros(1, 1, 3, 4), values=torch.zeros(1, 1, 3, 4),
                     slot=torch.zeros(1, dtype=torch.long), num_heads=2, num_kv_heads=1)
    return {**arguments, **changes}


@pytest.mark.parametrize("changes, message", [
    (dict(values=torch.zeros(1, 1, 2, 4)), r"keys and values must have one shape \(B, K, T, E\), found \(1, 1, 3, 4\) "
                                           r"and \(1, 1, 2, 4\)"),
    (dict(keys=torch.zeros(1, 3, 4), values=torch.zeros(1, 3, 4)), r"keys and values must have one shape"),
    (dict(slot=torch.zeros(1, dtype=torch.long, device="meta")), "slot must be on cpu like qkv, found meta"),
])
def test_rotating_into_a_cache_names_the_cache_or_slot_it_cannot_use(changes, message):
    with pytest.raises(ValueError, match=message):
        rotate_into_cache_triton(**_rotary_arguments(**changes))


def _no_launch(interpret):
    raise AssertionError("a kernel was launched")


def test_kernels_of_no_rows_or_no_outputs_are_empty_without_a_launch(monkeypatch):
    for module, name in (("adaln_linear", "_kernels"), ("add_rms_norm", "_kernel"), ("adaln_modulation", "_kernel")):
        monkeypatch.setattr(importlib.import_module(f"nextstep.kernels.{module}"), name, _no_launch)
    no_rows = torch.zeros(0, 4)
    assert modulated_linear_triton(no_rows, no_rows, no_rows, torch.zeros(3, 4), None).shape == (0, 3)
    assert modulated_linear_triton(ROWS, ROWS, ROWS, torch.zeros(0, 4), None).shape == (2, 0)
    assert gated_linear_triton(ROWS, torch.zeros(0, 4), None, torch.zeros(2, 0), torch.zeros(2, 0)).shape == (2, 0)
    total, normed = add_rms_norm_triton(no_rows, no_rows, torch.ones(4), 1e-6)
    assert total.shape == normed.shape == (0, 4)
    assert layer_norm_modulate_triton(no_rows, no_rows, no_rows).shape == (0, 4)


class _DoubledMLP(FlowMatchingMLP):
    def forward(self, x_t, t, condition):
        return 2 * super().forward(x_t, t, condition)


def test_a_head_whose_net_has_its_own_forward_evaluates_that_forward_unprepared(trained_like_model):
    head = trained_like_model.image_head
    head.net.__class__ = _DoubledMLP
    times = torch.tensor([0.25, 0.75])
    assert head.prepare_times(times) is times
    condition = torch.randn(2, head.condition_dim, generator=torch.Generator().manual_seed(0))
    x_t = torch.randn(2, head.token_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = 2 * FlowMatchingMLP.forward(head.net, x_t, times, condition)
        torch.testing.assert_close(head.prepare_net(condition, times)(x_t, times), expected)


def test_packed_projections_without_biases_are_kept_while_their_weights_view_them(tiny_model):
    backbone = Qwen2Backbone(tiny_model.backbone.config.replace(attention_bias=False))
    packs = pack_projections(backbone)
    assert packs[0].qkv_bias is None and pack_projections(backbone) is packs
