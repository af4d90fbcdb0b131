"""FLUX-shaped VAE weights across the BFL, diffusers, NextStep and native layouts."""

import json
import pickle
import re

import pytest
import torch
from safetensors.torch import save_file

from nextstep.tokenizers import FluxVAE, FluxVAEConfig, standardize_channels
from nextstep.tokenizers.vae_checkpoints import (
    bfl_to_diffusers,
    config_from_nextstep,
    detect_layout,
    diffusers_to_bfl,
    load_flux_vae,
    save_flux_vae,
)

TINY = FluxVAEConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8, z_channels=16,
                     normalization="none")


def tiny_vae(config=TINY, seed=0):
    torch.manual_seed(seed)
    vae = FluxVAE(config)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return vae.eval()


def images(size=(32, 48), seed=0):
    return torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.fixture(scope="module")
def diffusers_pair(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    reference = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[16, 32, 32], layers_per_block=1,
        latent_channels=16, norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=0.3611, shift_factor=0.1159,
    ).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    directory = tmp_path_factory.mktemp("diffusers_vae")
    reference.save_pretrained(str(directory))
    return reference, directory


def test_diffusers_parity_encode_and_decode(diffusers_pair):
    reference, directory = diffusers_pair
    assert detect_layout(directory) == "diffusers"
    ours = load_flux_vae(directory, normalization="none").eval()
    x = images()
    with torch.no_grad():
        expected_mean = reference.encode(x).latent_dist.mean
        mean, _ = ours.encode_moments(x)
        torch.testing.assert_close(mean, expected_mean, atol=1e-5, rtol=1e-5)
        z = torch.randn(2, 16, 4, 6)
        torch.testing.assert_close(ours.decode(z), reference.decode(z).sample, atol=1e-5, rtol=1e-5)


def test_diffusers_config_gives_flux_scale_and_shift(diffusers_pair):
    _, directory = diffusers_pair
    vae = load_flux_vae(directory)
    assert vae.config.normalization == "scale_shift"
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (0.3611, 0.1159)
    mean, _ = vae.encode_moments(images())
    torch.testing.assert_close(vae.encode(images()), (mean - 0.1159) * 0.3611)
    # Used the NextStep way, FLUX.1 weights are standardised alone: the checkpoint's scale and shift stay out.
    standardised = load_flux_vae(directory, normalization="layer_norm")
    assert (standardised.config.scaling_factor, standardised.config.shift_factor) == (1.0, 0.0)
    torch.testing.assert_close(standardised.encode(images()), standardize_channels(mean))


def test_diffusers_round_trip_both_ways(tmp_path):
    vae = tiny_vae()
    save_flux_vae(vae, tmp_path / "d", layout="diffusers")
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert config["block_out_channels"] == [16, 32, 32] and config["use_quant_conv"] is False
    assert_same_weights(vae, load_flux_vae(tmp_path / "d", normalization="none"))
    state = vae.state_dict()
    renamed = bfl_to_diffusers(state, 3)
    assert "decoder.up_blocks.0.upsamplers.0.conv.weight" in renamed  # lowest resolution first
    assert renamed["encoder.mid_block.attentions.0.to_q.weight"].shape == (32, 32)
    back = diffusers_to_bfl(renamed, 3)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def bfl_file(vae, path):
    state = {k: v.contiguous() for k, v in vae.state_dict().items()}
    save_file(state, str(path))
    return state


def test_bfl_layout_round_trip(tmp_path):
    vae = tiny_vae()
    state = bfl_file(vae, tmp_path / "ae.safetensors")
    # Real BFL key names and shapes.
    assert state["encoder.mid.attn_1.q.weight"].shape == (32, 32, 1, 1)
    assert "decoder.up.0.block.1.conv2.weight" in state and "decoder.up.2.upsample.conv.weight" in state
    assert detect_layout(tmp_path / "ae.safetensors") == "bfl"
    loaded = load_flux_vae(tmp_path / "ae.safetensors", norm_groups=8)
    assert loaded.config.ch_mult == (1, 2, 2) and loaded.config.num_res_blocks == 1
    assert loaded.config.normalization == "scale_shift" and loaded.config.scaling_factor == 0.3611
    assert_same_weights(vae, loaded)
    save_flux_vae(loaded, tmp_path / "out", layout="bfl")
    assert_same_weights(vae, load_flux_vae(tmp_path / "out" / "ae.safetensors", norm_groups=8))


def nextstep_dir(vae, directory, **fields):
    directory.mkdir(parents=True)
    config = {"resolution": 256, "in_channels": 3, "ch": 16, "out_ch": 3, "ch_mult": [1, 2, 2],
              "num_res_blocks": 1, "z_channels": 16, "scaling_factor": 1.0, "shift_factor": 0.0,
              "deterministic": True, "encoder_norm": True, "psz": 1, **fields}
    (directory / "config.json").write_text(json.dumps(config))
    torch.save(vae.state_dict(), directory / "checkpoint.pt")
    return directory


def test_nextstep_layout_round_trip(tmp_path):
    vae = tiny_vae(FluxVAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=16))
    nextstep_dir(vae, tmp_path / "model" / "vae", ch=32, psz=2)
    assert detect_layout(tmp_path / "model") == "nextstep"
    loaded = load_flux_vae(tmp_path / "model")
    assert loaded.config.normalization == "layer_norm" and loaded.config.normalization_patch_size == 2
    assert_same_weights(vae, loaded)
    save_flux_vae(loaded, tmp_path / "again", layout="nextstep")
    fields = json.loads((tmp_path / "again" / "config.json").read_text())
    assert fields["encoder_norm"] is True and fields["psz"] == 2
    assert_same_weights(vae, load_flux_vae(tmp_path / "again"))


def test_native_layout_round_trip(tmp_path):
    vae = tiny_vae()
    save_flux_vae(vae, tmp_path / "n")
    loaded = load_flux_vae(tmp_path / "n")
    assert loaded.config == vae.config
    assert_same_weights(vae, loaded)


def test_pickle_needing_code_is_refused(tmp_path):
    vae = tiny_vae(FluxVAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1))
    directory = nextstep_dir(vae, tmp_path / "vae", ch=32)

    class Payload:
        def __reduce__(self):
            return (print, ("executed",))

    with open(directory / "checkpoint.pt", "wb") as handle:
        pickle.dump({"state_dict": Payload()}, handle)
    with pytest.raises(ValueError, match="code execution"):
        load_flux_vae(directory)


def test_corrupt_and_missing_files_are_named(tmp_path):
    vae = tiny_vae()
    bfl_file(vae, tmp_path / "ae.safetensors")
    data = (tmp_path / "ae.safetensors").read_bytes()
    (tmp_path / "ae.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="ae.safetensors"):
        load_flux_vae(tmp_path / "ae.safetensors")
    with pytest.raises(FileNotFoundError, match="expected a VAE checkpoint at .*does_not_exist, found nothing"):
        load_flux_vae(tmp_path / "empty_dir_that_does_not_exist")


def test_a_nextstep_model_directory_is_named_as_one(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "model")
    with pytest.raises(FileNotFoundError, match="is a NextStep model, not a VAE checkpoint: load the model and take "
                                                "its image_tokenizer"):
        load_flux_vae(tmp_path / "model")


def test_missing_keys_are_listed(tmp_path):
    vae = tiny_vae()
    state = dict(vae.state_dict())
    del state["decoder.conv_out.bias"]
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "ae.safetensors"))
    with pytest.raises(ValueError, match="decoder.conv_out.bias"):
        load_flux_vae(tmp_path / "ae.safetensors", norm_groups=8)
    encoder_only = {k: v.contiguous() for k, v in vae.state_dict().items() if k.startswith("encoder.")}
    save_file(encoder_only, str(tmp_path / "encoder.safetensors"))
    with pytest.raises(ValueError, match=r"do not look like a FLUX autoencoder in BFL names .*missing "
                                         r"\['decoder.conv_out.weight'\]"):
        load_flux_vae(tmp_path / "encoder.safetensors")
    save_file({"x.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['encoder.conv_in.weight', .*found names such as \['x.weight'\]"):
        load_flux_vae(tmp_path / "other.safetensors")


@pytest.mark.parametrize("layout, name", [("diffusers", "diffusion_pytorch_model.safetensors"),
                                          ("native", "model.safetensors")])
def test_the_weights_file_of_a_directory_layout_loads_its_directory(tmp_path, layout, name):
    vae = tiny_vae()
    save_flux_vae(vae, tmp_path / "d", layout=layout)
    for given in (None, layout):
        assert_same_weights(vae, load_flux_vae(tmp_path / "d" / name, layout=given, normalization="none"))


def test_an_explicit_file_layout_reads_the_file_given(tmp_path):
    vae = tiny_vae()
    save_flux_vae(vae, tmp_path / "d", layout="native")
    bfl_file(vae, tmp_path / "d" / "model.safetensors")  # BFL names under the native file's name
    assert_same_weights(vae, load_flux_vae(tmp_path / "d" / "model.safetensors", layout="bfl", norm_groups=8))


def test_nextstep_config_fields(caplog):
    config = config_from_nextstep({"ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                                   "z_channels": 16, "encoder_norm": True, "psz": 2,
                                   "scaling_factor": 1.0, "shift_factor": 0.0, "deterministic": True,
                                   "resolution": 256, "in_channels": 3, "out_ch": 3})
    assert config == FluxVAEConfig(normalization="layer_norm", normalization_patch_size=2)
    # Unknown fields are ignored, as the release's loader ignores them; named unless they are metadata.
    with caplog.at_level("WARNING", logger="nextstep"):
        assert config_from_nextstep({"_class_name": "AutoencoderKL", "colour": 3}) == config_from_nextstep({})
    assert "ignoring unknown field(s) ['colour']" in caplog.text and "_class_name" not in caplog.text
    # ... but not a misspelling of a known field, whose default would take the place of the value meant.
    with pytest.raises(ValueError, match=r"'scaling_facter' \(did you mean 'scaling_factor'\?\)"):
        config_from_nextstep({"scaling_facter": 0.5})


def test_nextstep_config_fields_left_out_take_the_release_code_defaults():
    # FLUX.1's VAE as the release's code builds it: its scale and shift, no standardisation, a sampled posterior
    assert config_from_nextstep({}) == FluxVAEConfig(normalization="scale_shift", scaling_factor=0.3611,
                                                     shift_factor=0.1159, deterministic=False)
    assert config_from_nextstep({"encoder_norm": True}) == FluxVAEConfig(
        normalization="layer_norm", scaling_factor=0.3611, shift_factor=0.1159, deterministic=False)


def test_standardisation_with_a_scale_and_shift_round_trips(tmp_path):
    """The release's pipeline scales and shifts the standardised latents; both are kept and written back."""
    vae = tiny_vae(FluxVAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=16))
    nextstep_dir(vae, tmp_path / "vae", ch=32, scaling_factor=0.5, shift_factor=0.125)
    loaded = load_flux_vae(tmp_path / "vae")
    assert (loaded.config.normalization, loaded.config.scaling_factor, loaded.config.shift_factor) == (
        "layer_norm", 0.5, 0.125)
    save_flux_vae(loaded, tmp_path / "again", layout="nextstep")
    fields = json.loads((tmp_path / "again" / "config.json").read_text())
    assert (fields["encoder_norm"], fields["scaling_factor"], fields["shift_factor"]) == (True, 0.5, 0.125)


@pytest.mark.parametrize("layout, changes, lost", [
    ("nextstep", {"norm_groups": 8}, "norm_groups=8 (it would load as 32)"),
    ("diffusers", {"normalization": "layer_norm", "normalization_patch_size": 2},
     "normalization='layer_norm' (it would load as 'none'), normalization_patch_size=2"),
    ("diffusers", {"deterministic": False}, "deterministic=False (it would load as True)"),
    ("bfl", {"normalization": "scale_shift", "scaling_factor": 0.5}, "scaling_factor=0.5 (it would load as 0.3611)"),
    ("nextstep", {"patch_size": 4}, "patch_size=4 (it would load as 2)"),
])
def test_a_layout_that_cannot_hold_a_setting_refuses_to_write(tmp_path, layout, changes, lost):
    vae = FluxVAE(TINY.replace(**{"ch": 32, "norm_groups": 32, **changes}))
    with pytest.raises(ValueError, match=re.escape(lost)):
        save_flux_vae(vae, tmp_path / "out", layout=layout)
    assert not (tmp_path / "out").exists()
    save_flux_vae(vae, tmp_path / "out", layout=layout, lossy=True)  # the weights alone, when asked
    assert_same_weights(vae, load_flux_vae(tmp_path / "out"))


def test_equivalent_latent_handling_saves_where_a_layout_can_say_it(tmp_path):
    vae = FluxVAE(TINY.replace(ch=32, norm_groups=32, normalization="scale_shift", scaling_factor=1.0,
                               shift_factor=0.0))
    for layout in ("diffusers", "nextstep"):  # scaling by 1 and 0 is no scaling at all
        save_flux_vae(vae, tmp_path / layout, layout=layout)
        loaded = load_flux_vae(tmp_path / layout).config
        assert loaded.normalization == "none" or (loaded.scaling_factor, loaded.shift_factor) == (1.0, 0.0)
    with pytest.raises(ValueError, match="scaling_factor=1.0 .it would load as 0.3611."):
        save_flux_vae(vae, tmp_path / "bfl", layout="bfl")  # a FLUX.1 file loads with FLUX.1's scale and shift


def test_a_psz_2_tokenizer_standardises_each_2x2_block_of_latents():
    """``psz`` 2 (normalization_patch_size): the 16 x 4 values of each 2x2 block of positions are standardised
    together, not each position's channel vector on its own."""
    from einops import rearrange

    vae = tiny_vae(TINY.replace(normalization="layer_norm", normalization_patch_size=2))
    pixels = images()
    with torch.no_grad():
        latents = vae.encode(pixels)
        mean, _ = vae.encode_moments(pixels)
    blocks = rearrange(latents, "b c (h p) (w q) -> b h w (c p q)", p=2, q=2)
    torch.testing.assert_close(blocks.mean(-1), torch.zeros_like(blocks.mean(-1)), atol=1e-5, rtol=0)
    torch.testing.assert_close(blocks.var(-1, unbiased=False), torch.ones_like(blocks.mean(-1)), atol=1e-3,
                               rtol=0)
    assert latents.mean(1).abs().max() > 0.05  # positions within a block keep their own levels
    torch.testing.assert_close(latents, standardize_channels(mean, 2))
    assert not torch.allclose(latents, standardize_channels(mean, 1), atol=1e-3)


@pytest.mark.parametrize("prefix", ["vae.", "first_stage_model.", "ae.", "module."])
def test_a_prefix_every_key_carries_is_dropped_and_a_stray_prefixed_key_is_named(tmp_path, prefix):
    vae = tiny_vae()
    state = {k: v.contiguous() for k, v in vae.state_dict().items()}
    save_file({prefix + k: v for k, v in state.items()}, str(tmp_path / "ae.safetensors"))
    assert_same_weights(vae, load_flux_vae(tmp_path / "ae.safetensors", norm_groups=8))
    wide = tiny_vae(FluxVAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=16))
    nextstep_dir(wide, tmp_path / "vae", ch=32)
    torch.save({prefix + k: v for k, v in wide.state_dict().items()}, tmp_path / "vae" / "checkpoint.pt")
    assert_same_weights(wide, load_flux_vae(tmp_path / "vae"))
    # Only some keys prefixed: nothing is stripped (the VAE's own names stay whole), the stray key is named.
    save_file({**state, prefix + "extra": torch.zeros(2)}, str(tmp_path / "ae.safetensors"))
    with pytest.raises(ValueError, match=re.escape(f"unexpected keys ['{prefix}extra']")):
        load_flux_vae(tmp_path / "ae.safetensors", norm_groups=8)
