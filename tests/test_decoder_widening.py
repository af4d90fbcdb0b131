"""A widened decoder draws what the narrow one drew, from bit-identical latents, and then trains."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from nextstep.builders import build_model
from nextstep.image_decoder import replace_image_decoder
from nextstep.model import NextStep
from nextstep.tokenizers.decoder_widening import widen_decoder, widened_config
from nextstep.tokenizers.flux_vae import FluxVAE, FluxVAEConfig
from nextstep.tokenizers.vae_checkpoints import load_flux_vae, save_flux_vae


def _vae(ch: int, groups: int, levels: int, seed: int = 0) -> FluxVAE:
    torch.manual_seed(seed)
    vae = FluxVAE(FluxVAEConfig(ch=ch, ch_mult=(1, 2, 2, 4)[:levels], num_res_blocks=1, norm_groups=groups,
                                z_channels=4)).eval()
    with torch.no_grad():  # trained-looking norms and biases, not the 1/0 defaults
        for name, parameter in vae.named_parameters():
            if "norm" in name or name.endswith("bias"):
                parameter.add_(0.3 * torch.randn_like(parameter))
    return vae


@settings(max_examples=12, deadline=None)
@given(ch_groups=st.sampled_from([(4, 2), (8, 4), (8, 2), (6, 3)]), factor=st.sampled_from([1, 1.5, 2, 3]),
       levels=st.integers(2, 4), side=st.sampled_from([16, 24]), seed=st.integers(0, 3))
def test_the_wider_decoder_draws_the_same_images_from_the_same_latents(ch_groups, factor, levels, side, seed):
    ch, groups = ch_groups
    assume((ch * factor) % 1 == 0 and (groups * factor) % 1 == 0)
    narrow = _vae(ch, groups, levels, seed)
    wide = widen_decoder(narrow, int(ch * factor), seed=seed).eval()
    assert wide.config.decoder_width == int(ch * factor)
    assert wide.config.decoder_groups == int(groups * factor)
    images = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    with torch.no_grad():
        latents = narrow.encode(images)
        torch.testing.assert_close(wide.encode(images), latents, rtol=0, atol=0)
        torch.testing.assert_close(wide.decode(latents), narrow.decode(latents), rtol=1e-4, atol=1e-5)


def test_the_new_channels_start_learning_after_one_step():
    narrow = _vae(8, 4, 3)
    wide = widen_decoder(narrow, 16).train()
    optimizer = torch.optim.SGD(wide.decoder.parameters(), lr=0.1)
    latents = torch.randn(2, 4, 4, 4)
    level0 = wide.decoder.up[0].block[0]
    wide.decode(latents).square().mean().backward()
    assert level0.conv2.weight.grad[:8, 8:].abs().sum() > 0  # the zero block reading new channels moves
    optimizer.step()
    optimizer.zero_grad()
    wide.decode(latents).square().mean().backward()
    assert level0.conv1.weight.grad[8:].abs().sum() > 0  # then the new channels' own weights do


def test_widening_refuses_a_narrower_decoder_or_broken_groups():
    narrow = _vae(8, 4, 3)
    with pytest.raises(ValueError, match="at least the current decoder width 8, found 4"):
        widened_config(narrow, 4)
    with pytest.raises(ValueError, match="4 \\* 9 / 8 = 4.5 groups is not whole"):
        widened_config(narrow, 9)
    with pytest.raises(ValueError, match="decoder_norm_groups"):
        FluxVAEConfig(ch=8, ch_mult=(1, 2), norm_groups=4, decoder_ch=12, decoder_norm_groups=8)


def test_a_wide_decoder_saves_loads_and_goes_into_a_model(tmp_path):
    model = build_model("tiny", seed=0).eval()
    wide = widen_decoder(model.image_tokenizer, 2 * model.image_tokenizer.config.ch, seed=1)
    with torch.no_grad():
        for parameter in wide.decoder.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    save_flux_vae(wide, tmp_path / "tokenizer")
    loaded = load_flux_vae(tmp_path / "tokenizer").eval()
    assert loaded.config == wide.config
    latents = torch.randn(1, model.image_tokenizer.latent_channels, 4, 4)
    replace_image_decoder(model, loaded)
    torch.testing.assert_close(model.image_tokenizer.decode(latents), loaded.decode(latents))
    assert not any(p.requires_grad for p in model.image_tokenizer.decoder.parameters())
    model.save_pretrained(tmp_path / "model")
    again = NextStep.from_pretrained(tmp_path / "model").eval()
    assert again.image_tokenizer.config.decoder_ch == wide.config.decoder_ch
    torch.testing.assert_close(again.image_tokenizer.decode(latents), loaded.decode(latents))


@pytest.mark.parametrize("layout", ["diffusers", "nextstep", "bfl"])
def test_layouts_with_one_width_refuse_a_wide_decoder(tmp_path, layout):
    wide = widen_decoder(_vae(8, 4, 3), 16)
    with pytest.raises(ValueError, match="decoder 16 wide with 8 groups beside an encoder 8 wide with 4"):
        save_flux_vae(wide, tmp_path / layout, layout=layout)
    assert not (tmp_path / layout).exists()


def test_a_symmetric_config_writes_as_it_did_before_the_decoder_fields():
    # Latent caches fingerprint the tokenizer's config: a symmetric VAE must keep its old JSON.
    symmetric = FluxVAEConfig(ch=8, ch_mult=(1, 2), norm_groups=4)
    assert "decoder_ch" not in symmetric.to_dict() and "decoder_norm_groups" not in symmetric.to_dict()
    assert FluxVAEConfig.from_dict(symmetric.to_dict()) == symmetric
    wide = symmetric.replace(decoder_ch=16, decoder_norm_groups=8)
    assert (wide.to_dict()["decoder_ch"], wide.to_dict()["decoder_norm_groups"]) == (16, 8)
    assert FluxVAEConfig.from_dict(wide.to_dict()) == wide


def test_a_widened_decoder_keeps_the_encoding_identity_and_an_encoder_change_does_not():
    """Latents cached for a tokenizer serve it after its decoder is widened (the encoder is the same), not after
    a change to what encoding does."""
    from nextstep.training.data.latent_cache import tokenizer_fingerprint

    narrow = _vae(8, 4, 3)
    wide = widen_decoder(narrow, 16, seed=1)
    assert (wide.config.decoder_ch, wide.config.decoder_norm_groups) != (narrow.config.decoder_ch,
                                                                         narrow.config.decoder_norm_groups)
    (narrow_text, narrow_tensors), (wide_text, wide_tensors) = narrow.encoding_identity(), wide.encoding_identity()
    assert wide_text == narrow_text
    assert narrow_tensors.keys() == wide_tensors.keys()
    assert all(torch.equal(wide_tensors[name], narrow_tensors[name]) for name in narrow_tensors)
    assert tokenizer_fingerprint(wide) == tokenizer_fingerprint(narrow)
    other = FluxVAE(narrow.config.replace(normalization_patch_size=2))
    other.load_state_dict(narrow.state_dict())
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(narrow)


@pytest.mark.parametrize("training", [True, False])
def test_the_widened_tokenizer_keeps_the_train_or_eval_mode_it_was_given(training):
    """widen_decoder returns a tokenizer in the same train/eval mode as the one it widened, every submodule too."""
    narrow = _vae(8, 4, 2).train(training)
    wide = widen_decoder(narrow, 16)
    assert all(module.training is training for module in wide.modules())


def test_widening_leaves_the_caller_s_random_state_as_it_was():
    """The new channels' random weights come from ``seed`` alone; the global random state does not move."""
    narrow = _vae(8, 4, 2)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    first = widen_decoder(narrow, 16, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(7)
    again = widen_decoder(narrow, 16, seed=5)
    for (name, a), b in zip(first.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
