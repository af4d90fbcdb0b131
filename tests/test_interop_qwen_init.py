"""A new NextStep model from a plain Qwen2.5 checkpoint: vocabulary extension, kept weights, fresh parts."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from interop_synthetic import write_qwen_checkpoint

from nextstep.generation import generate_tokens
from nextstep.interop import initialize_rows_from_mean, nextstep_from_qwen, save_release_checkpoint
from nextstep.interop.qwen_init import padded_vocab_size, row_statistics
from nextstep.model import NextStep
from nextstep.tokenizers import FluxVAE, FluxVAEConfig

QWEN25_TOKENS = 151665  # 151,643 BPE tokens + 22 added tokens
NEXTSTEP_IDS = {"[PAD]": 151665, "<|image_area|>": 151666, "<|begin_of_image|>": 151667,
                "<|end_of_image|>": 151668, "<|image_placeholder|>": 151669, "<|end_of_thinking|>": 151673}


def tiny_vae() -> FluxVAE:
    torch.manual_seed(0)
    return FluxVAE(FluxVAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, z_channels=4))


@pytest.fixture(scope="module")
def qwen_exact(tmp_path_factory):
    """A Qwen2 checkpoint whose embedding table has exactly the tokenizer's 151,665 rows (it must grow)."""
    from transformers import Qwen2ForCausalLM

    directory = tmp_path_factory.mktemp("qwen") / "Qwen2.5-tiny"
    write_qwen_checkpoint(directory, vocab_size=QWEN25_TOKENS)
    return directory, Qwen2ForCausalLM.from_pretrained(str(directory)).eval()


@pytest.fixture(scope="module")
def initialised(qwen_exact):
    return nextstep_from_qwen(qwen_exact[0], image_tokenizer=tiny_vae(), head="tiny", seed=1)


def test_special_tokens_get_the_release_ids_and_the_table_grows(initialised):
    tokenizer = initialised.text_tokenizer
    assert {token: tokenizer.special_token_id(token) for token in NEXTSTEP_IDS} == NEXTSTEP_IDS
    assert tokenizer.vocab_size == 151674
    assert initialised.backbone.vocab_size == 151680 == padded_vocab_size(151674, 64)
    assert initialised.backbone.embed_tokens.weight.shape == (151680, 32)
    assert initialised.lm_head.output_weight().shape == (151680, 32)


def test_language_model_weights_are_kept_and_give_the_same_logits(qwen_exact, initialised):
    _, reference = qwen_exact
    embeddings = initialised.backbone.embed_tokens.weight
    assert torch.equal(embeddings[:QWEN25_TOKENS], reference.model.embed_tokens.weight)
    assert torch.equal(initialised.lm_head.weight[:QWEN25_TOKENS], reference.lm_head.weight)
    ids = torch.tensor([initialised.text_tokenizer.encode("a photo of a cat on a mat")])
    positions = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        hidden = initialised.backbone(initialised.backbone.embed(ids), positions)
        logits = initialised.lm_head(hidden)
        expected = reference(ids).logits
    torch.testing.assert_close(logits[..., :QWEN25_TOKENS], expected, atol=1e-5, rtol=1e-5)


def test_new_rows_start_near_the_mean_of_the_trained_rows(initialised):
    for weight in (initialised.backbone.embed_tokens.weight, initialised.lm_head.weight):
        mean, variance = row_statistics(weight, QWEN25_TOKENS)
        new = weight[QWEN25_TOKENS:].detach()
        assert new.shape[0] == 15
        assert (new - mean).abs().max() < 10 * (variance * 1e-5).sqrt().max()
        assert torch.unique(new, dim=0).shape[0] == new.shape[0]


def test_fresh_projectors_and_head(initialised):
    for projector in (initialised.image_in_projector, initialised.image_out_projector):
        assert projector.bias.abs().max() == 0
        assert 0.01 < projector.weight.std() < 0.03
    assert initialised.image_head.config.width == 64 and initialised.image_head.config.condition_dim == 32
    assert initialised.image_head.net.final_layer.linear.weight.abs().max() == 0
    assert initialised.config.sampler.type == "euler_maruyama"


@pytest.fixture
def small_qwen(tmp_path):
    """A Qwen2 checkpoint with a 256-byte vocabulary (278 tokens with Qwen's added ones) in a 300-row table."""
    write_qwen_checkpoint(tmp_path / "qwen", vocab_size=300, num_layers=1, vocabulary="small")
    return tmp_path / "qwen"


def test_initialised_model_generates_saves_and_converts(small_qwen, tmp_path):
    model = nextstep_from_qwen(small_qwen, image_tokenizer=tiny_vae(), head="tiny")
    tokens, grid_h, grid_w = generate_tokens(model, ["a cat"], height=32, width=32, cfg=2.0, num_steps=3)
    assert tokens.shape == (1, 4, 16) and torch.isfinite(tokens).all()
    model.save_pretrained(tmp_path / "native")
    native = NextStep.from_pretrained(tmp_path / "native")
    save_release_checkpoint(native, tmp_path / "release", max_shard_size=16 * 1024)
    release = NextStep.from_pretrained(tmp_path / "release")
    reference = model.state_dict()
    assert all(torch.equal(tensor, reference[key]) for key, tensor in release.state_dict().items())
    assert release.text_tokenizer.special_token_id("<|image_placeholder|>") == 278 + 4
    # The tokenizer files name NextStep's tokens as the release's tokenizer does: [PAD] pads.
    import json

    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        written = json.loads((tmp_path / "release" / name).read_text())
        assert written["pad_token"] == "[PAD]", name
        assert not {"local_files_only", "is_local", "backend"} & set(written), name
        assert [t for t in written["additional_special_tokens"] if t.startswith("<|")][:4] == [
            "<|image_area|>", "<|begin_of_image|>", "<|end_of_image|>", "<|image_placeholder|>"], name
    assert release.text_tokenizer.tokenizer.pad_token_id == 278 + 0
    source = json.loads((small_qwen / "config.json").read_text())
    written = json.loads((tmp_path / "release" / "config.json").read_text())
    carried = [name for name in ("max_position_embeddings", "initializer_range", "bos_token_id")
               if source.get(name) is not None]
    assert "max_position_embeddings" in carried and all(written[name] == source[name] for name in carried)


def test_a_table_with_room_keeps_its_size_and_its_unused_rows(small_qwen):
    from safetensors.torch import load_file

    original = load_file(str(small_qwen / "model.safetensors"))["model.embed_tokens.weight"]
    model = nextstep_from_qwen(small_qwen, image_tokenizer=tiny_vae(), head="tiny")
    weight = model.backbone.embed_tokens.weight
    base, extended = 278, 278 + 9
    assert weight.shape == (300, 32) and model.text_tokenizer.vocab_size == extended
    assert torch.equal(weight[:base], original[:base])
    assert torch.equal(weight[extended:], original[extended:])
    assert not torch.equal(weight[base:extended], original[base:extended])


def test_tied_small_model_and_dtype(tmp_path):
    write_qwen_checkpoint(tmp_path / "qwen", vocab_size=300, tied=True, vocabulary="small")
    model = nextstep_from_qwen(tmp_path / "qwen", image_tokenizer=tiny_vae(), head="tiny", dtype=torch.bfloat16)
    assert model.lm_head.tied and model.backbone.vocab_size == 300
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_without_a_dtype_the_transformer_takes_the_checkpoints_and_the_vae_keeps_its_own(tmp_path):
    write_qwen_checkpoint(tmp_path / "qwen", vocab_size=300, vocabulary="small", dtype=torch.bfloat16)
    vae = tiny_vae()
    model = nextstep_from_qwen(tmp_path / "qwen", image_tokenizer=vae, head="tiny")
    assert model.image_tokenizer is vae and {p.dtype for p in vae.parameters()} == {torch.float32}
    rest = [p for name, p in model.named_parameters() if not name.startswith("image_tokenizer.")]
    assert {p.dtype for p in rest} == {torch.bfloat16}
    from nextstep.tokenizers.vae_checkpoints import save_flux_vae

    save_flux_vae(vae, tmp_path / "vae")
    from_path = nextstep_from_qwen(tmp_path / "qwen", image_tokenizer=tmp_path / "vae", head="tiny")
    assert {p.dtype for p in from_path.image_tokenizer.parameters()} == {torch.float32}


def test_bad_directories_are_refused(tmp_path):
    write_qwen_checkpoint(tmp_path / "qwen", vocab_size=300, vocabulary="small")
    config = (tmp_path / "qwen" / "config.json")
    config.write_text(config.read_text().replace('"qwen2"', '"llama"'))
    with pytest.raises(ValueError, match="model_type 'llama'.*'qwen2'"):
        nextstep_from_qwen(tmp_path / "qwen", image_tokenizer=tiny_vae())
    write_qwen_checkpoint(tmp_path / "wide", vocab_size=300, vocabulary="small")
    config = (tmp_path / "wide" / "config.json")
    config.write_text(config.read_text().replace('"intermediate_size": 48', '"intermediate_size": 40'))
    with pytest.raises(ValueError, match=r"mlp.up_proj.weight: expected \(40, 32\), found \(48, 32\)"):
        nextstep_from_qwen(tmp_path / "wide", image_tokenizer=tiny_vae())


@pytest.mark.parametrize("stated", [320, 280])
def test_a_table_of_another_length_than_the_config_s_vocab_size_is_refused(tmp_path, stated):
    """Rows past a shorter table would be left as uninitialised memory; a longer one would be cut."""
    write_qwen_checkpoint(tmp_path / "qwen", vocab_size=300, vocabulary="small")
    config = tmp_path / "qwen" / "config.json"
    config.write_text(config.read_text().replace('"vocab_size": 300', f'"vocab_size": {stated}'))
    with pytest.raises(ValueError, match=rf"embed_tokens.weight in .* has shape \(300, 32\); expected "
                                         rf"\({stated}, 32\), the vocab_size and hidden_size of its config.json"):
        nextstep_from_qwen(tmp_path / "qwen", image_tokenizer=tiny_vae())


def test_a_config_without_a_required_field_is_named_with_its_file(tmp_path):
    write_qwen_checkpoint(tmp_path / "qwen", vocab_size=300, vocabulary="small")
    config = tmp_path / "qwen" / "config.json"
    fields = json.loads(config.read_text())
    del fields["vocab_size"]
    config.write_text(json.dumps(fields))
    with pytest.raises(ValueError, match=r"qwen/config.json: Hugging Face config.json lacks the required key "
                                         r"'vocab_size'"):
        nextstep_from_qwen(tmp_path / "qwen", image_tokenizer=tiny_vae())


@given(rows=st.integers(2, 40), width=st.integers(1, 8), new=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_initialize_rows_from_mean_property(rows, width, new, seed):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows + new, width, generator=generator) * 3 + 1
    trained = weight[:rows].clone()
    initialize_rows_from_mean(weight, list(range(rows, rows + new)), rows, noise_variance_scale=0.0)
    assert torch.equal(weight[:rows], trained)
    torch.testing.assert_close(weight[rows:], trained.double().mean(0).float().expand(new, width))


@given(rows=st.integers(1, 30), extra=st.integers(0, 5), width=st.integers(1, 6), chunk=st.integers(1, 7),
       seed=st.integers(0, 2**16))
def test_row_statistics_are_the_mean_and_population_variance_of_the_leading_rows(rows, extra, width, chunk, seed):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows + extra, width, generator=generator) * 3 + 2
    weight[rows:] = 1000.0  # rows past the trained ones never count
    mean, variance = row_statistics(weight, rows, chunk=chunk)
    assert mean.dtype == variance.dtype == torch.float32 and mean.shape == variance.shape == (width,)
    trained = weight[:rows].double()
    torch.testing.assert_close(mean, trained.mean(0).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(variance, trained.var(0, unbiased=False).float(), rtol=1e-4, atol=1e-4)


def test_new_rows_scatter_with_the_given_share_of_the_trained_rows_variance():
    generator = torch.Generator().manual_seed(0)
    trained, new, width = 500, 4000, 6
    weight = torch.cat([torch.randn(trained, width, generator=generator) * 2.0 + 1.0, torch.zeros(new, width)])
    variance = weight[:trained].double().var(0, unbiased=False)
    initialize_rows_from_mean(weight, list(range(trained, trained + new)), trained, noise_variance_scale=0.01,
                              generator=torch.Generator().manual_seed(1))
    spread = weight[trained:].double().var(0, unbiased=False)
    # Variance 0.01 of the trained rows' (about 4): a standard deviation near 0.2, not 0.04 or 2.
    torch.testing.assert_close(spread / variance, torch.full_like(spread, 0.01), rtol=0.1, atol=0)


def test_every_added_token_row_starts_at_the_mean_of_the_rows_the_tokenizer_knew(small_qwen):
    """Rows past the base tokenizer's 278 tokens hold no trained vectors, even when the table has them: the new
    tokens' rows come from the mean of the first 278 rows only, each one of them, [PAD] (the first) included."""
    from safetensors.torch import load_file, save_file

    path = small_qwen / "model.safetensors"
    state = load_file(str(path))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        state[name][278:] = 5.0  # never-trained rows a checkpoint may hold anything in
    save_file(state, str(path), metadata={"format": "pt"})
    model = nextstep_from_qwen(small_qwen, image_tokenizer=tiny_vae(), head="tiny")
    tokenizer = model.text_tokenizer
    assert tokenizer.special_token_id("[PAD]") == 278 and tokenizer.vocab_size == 278 + 9
    for name, weight in (("model.embed_tokens.weight", model.backbone.embed_tokens.weight),
                         ("lm_head.weight", model.lm_head.weight)):
        known = state[name][:278].double()
        mean, std = known.mean(0), known.std(0, unbiased=False)
        for row in range(278, 287):
            new = weight[row].detach().double()
            assert not torch.equal(new.float(), state[name][row]), (name, row)
            assert ((new - mean).abs() <= 10 * 1e-5**0.5 * std).all(), (name, row)
        assert torch.equal(weight[287:], state[name][287:])  # unused rows stay as they were


def test_a_qwen_config_without_tie_word_embeddings_has_its_own_lm_head(small_qwen):
    """Hugging Face reads a Qwen2 ``config.json`` without ``tie_word_embeddings`` as untied: the LM head is the
    checkpoint's ``lm_head.weight``, for the backbone loader and for a new NextStep model alike."""
    import json

    from safetensors.torch import load_file

    from nextstep.backbones import load_qwen2_backbone, load_qwen2_lm_head

    config_path = small_qwen / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("tie_word_embeddings", None)
    config_path.write_text(json.dumps(config))
    stored = load_file(str(small_qwen / "model.safetensors"))["lm_head.weight"]
    backbone = load_qwen2_backbone(small_qwen)
    head = load_qwen2_lm_head(small_qwen, backbone)
    assert not head.tied and torch.equal(head.output_weight(), stored)
    model = nextstep_from_qwen(small_qwen, image_tokenizer=tiny_vae(), head="tiny")
    assert not model.lm_head.tied and torch.equal(model.lm_head.weight[:278], stored[:278])


def test_a_model_from_qwen_normalises_its_tokens_only_for_a_standardising_vae(small_qwen):
    flux_shaped = FluxVAE(FluxVAEConfig(ch=8, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=4,
                                        normalization="scale_shift"))
    assert not nextstep_from_qwen(small_qwen, image_tokenizer=flux_shaped, head="tiny").config.use_norm
    standardising = FluxVAE(FluxVAEConfig(ch=8, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=4,
                                          normalization="layer_norm"))
    assert nextstep_from_qwen(small_qwen, image_tokenizer=standardising, head="tiny").config.use_norm
