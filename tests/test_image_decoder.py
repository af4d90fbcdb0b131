"""Replacing a model's image decoder keeps its latent space and refuses any other tokenizer."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from nextstep.builders import build_model
from nextstep.cli import main
from nextstep.image_decoder import replace_image_decoder
from nextstep.model import NextStep
from nextstep.tokenizers.vae_checkpoints import save_flux_vae


def _fine_tuned_decoder(model: NextStep, seed: int = 1):
    """The model's tokenizer with its decoder moved, as a decoder-only fine-tune leaves it."""
    tokenizer = copy.deepcopy(model.image_tokenizer)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in tokenizer.decoder.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return tokenizer


def test_the_new_decoder_draws_and_the_latents_stay_the_same():
    model = build_model("tiny", seed=0).eval()
    tokenizer = _fine_tuned_decoder(model)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    latents_before = model.image_tokenizer.encode(images)
    replace_image_decoder(model, tokenizer)
    torch.testing.assert_close(model.image_tokenizer.encode(images), latents_before, rtol=0, atol=0)
    torch.testing.assert_close(model.image_tokenizer.decode(latents_before), tokenizer.decode(latents_before))
    assert model.image_tokenizer is not tokenizer  # weights copied, not the module shared


def test_a_tokenizer_with_another_encoder_is_refused_by_key():
    model = build_model("tiny", seed=0)
    tokenizer = _fine_tuned_decoder(model)
    with torch.no_grad():
        tokenizer.encoder.conv_in.weight.add_(1e-3)
    decoder_before = copy.deepcopy(model.image_tokenizer.decoder.state_dict())
    with pytest.raises(ValueError, match=r"encoder weight encoder\.conv_in\.weight differs"):
        replace_image_decoder(model, tokenizer)
    for key, value in model.image_tokenizer.decoder.state_dict().items():
        assert torch.equal(value, decoder_before[key])  # nothing copied


def test_a_tokenizer_with_another_config_is_refused_by_field():
    model = build_model("tiny", seed=0)
    tokenizer = _fine_tuned_decoder(model)
    tokenizer.config = tokenizer.config.replace(scaling_factor=2.0)
    with pytest.raises(ValueError, match="configs differ at 'scaling_factor'"):
        replace_image_decoder(model, tokenizer)


def test_the_command_writes_a_model_with_the_new_decoder(tmp_path, capsys):
    model = build_model("tiny", seed=0).eval()
    model.save_pretrained(tmp_path / "model")
    tokenizer = _fine_tuned_decoder(model)
    save_flux_vae(tokenizer, tmp_path / "tokenizer")
    assert main(["replace-decoder", str(tmp_path / "model"), str(tmp_path / "tokenizer"),
                 str(tmp_path / "out")]) == 0
    assert "wrote" in capsys.readouterr().out
    written = NextStep.from_pretrained(tmp_path / "out").eval()
    latents = torch.randn(1, model.image_tokenizer.latent_channels, 4, 4)
    torch.testing.assert_close(written.image_tokenizer.decode(latents), tokenizer.decode(latents))
    torch.testing.assert_close(written.backbone.embed_tokens.weight, model.backbone.embed_tokens.weight)

    other = _fine_tuned_decoder(model)
    with torch.no_grad():
        other.encoder.conv_in.bias.add_(1.0)
    save_flux_vae(other, tmp_path / "other")
    assert main(["replace-decoder", str(tmp_path / "out"), str(tmp_path / "other"), str(tmp_path / "out")]) == 2
    assert "encoder weight encoder.conv_in.bias differs" in capsys.readouterr().err
    torch.testing.assert_close(NextStep.from_pretrained(tmp_path / "out").image_tokenizer.decode(latents),
                               tokenizer.decode(latents))  # the failed call left the model as it was


def test_the_command_can_store_the_decoder_in_16_bits(tmp_path, capsys):
    model = build_model("tiny", seed=0).eval()
    model.save_pretrained(tmp_path / "model")
    tokenizer = _fine_tuned_decoder(model)
    save_flux_vae(tokenizer, tmp_path / "tokenizer")
    assert main(["replace-decoder", str(tmp_path / "model"), str(tmp_path / "tokenizer"), str(tmp_path / "out"),
                 "--decoder-dtype", "float16"]) == 0
    assert "stored in float16" in capsys.readouterr().out
    written = NextStep.from_pretrained(tmp_path / "out").eval()
    assert next(written.image_tokenizer.decoder.parameters()).dtype == torch.float32
    latents = torch.randn(1, model.image_tokenizer.latent_channels, 4, 4)
    torch.testing.assert_close(written.image_tokenizer.decode(latents), tokenizer.decode(latents),
                               rtol=0, atol=5e-3)


def test_the_command_takes_the_decoder_of_another_model_bit_for_bit(tmp_path, capsys):
    model = build_model("tiny", seed=0).eval()
    model.save_pretrained(tmp_path / "model")
    save_flux_vae(_fine_tuned_decoder(model), tmp_path / "tokenizer")
    assert main(["replace-decoder", str(tmp_path / "model"), str(tmp_path / "tokenizer"), str(tmp_path / "donor"),
                 "--decoder-dtype", "float16"]) == 0
    # Another model with the same encoder (here the original) takes the donor model's 16-bit decoder.
    assert main(["replace-decoder", str(tmp_path / "model"), str(tmp_path / "donor"), str(tmp_path / "out"),
                 "--decoder-dtype", "float16"]) == 0
    assert "wrote" in capsys.readouterr().out
    donor = load_file(tmp_path / "donor" / "model.safetensors")
    written = load_file(tmp_path / "out" / "model.safetensors")
    decoder = [key for key in donor if ".decoder." in key]
    assert decoder and all(torch.equal(written[key], donor[key]) for key in decoder)
    assert main(["replace-decoder", str(tmp_path / "model"), str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_a_replaced_decoder_takes_the_model_s_train_or_eval_mode():
    from nextstep.image_decoder import replace_image_decoder

    model = build_model("tiny", seed=0)
    donor = copy.deepcopy(model.image_tokenizer)
    model.train()
    replace_image_decoder(model, donor.eval())
    assert model.image_tokenizer.decoder.training
    model.eval()
    replace_image_decoder(model, donor.train())
    assert not model.image_tokenizer.decoder.training


def test_a_new_decoder_of_another_dtype_takes_the_model_s_dtype():
    model = build_model("tiny", seed=0).eval()
    tokenizer = _fine_tuned_decoder(model).to(torch.float64)
    latents = model.image_tokenizer.encode(torch.rand(2, 3, 32, 32) * 2 - 1)
    replace_image_decoder(model, tokenizer)
    assert {p.dtype for p in model.image_tokenizer.decoder.parameters()} == {torch.float32}
    decoded = model.image_tokenizer.decode(latents)
    assert decoded.dtype == torch.float32
    torch.testing.assert_close(decoded, tokenizer.decode(latents.double()).float(), rtol=1e-4, atol=1e-4)


def test_a_model_with_a_widened_decoder_takes_a_wider_one():
    from nextstep.tokenizers.decoder_widening import widen_decoder

    model = build_model("tiny", seed=0).eval()
    width = model.image_tokenizer.config.ch
    replace_image_decoder(model, widen_decoder(model.image_tokenizer, 2 * width, seed=1))
    assert model.image_tokenizer.config.decoder_ch == 2 * width
    wider = widen_decoder(model.image_tokenizer, 4 * width, seed=2)
    latents = torch.randn(1, model.image_tokenizer.latent_channels, 4, 4)
    replace_image_decoder(model, wider)
    assert model.image_tokenizer.config.decoder_ch == 4 * width
    assert model.image_tokenizer.config.decoder_norm_groups == wider.config.decoder_norm_groups
    torch.testing.assert_close(model.image_tokenizer.decode(latents), wider.decode(latents))
