import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nextstep.tokenizers import FluxVAE, FluxVAEConfig, standardize_channels
from nextstep.tokenizers.base import ImageTokenizer
from nextstep.tokenizers.latent_normalization import perturb_latents

tokenizer = FluxVAE(FluxVAEConfig(ch=8, ch_mult=(1, 1), num_res_blocks=1, norm_groups=4, z_channels=3))


@given(batch=st.integers(1, 3), h=st.integers(1, 7), w=st.integers(1, 7), seed=st.integers(0, 2**16))
def test_patchify_unpatchify_inverse_on_any_grid(batch, h, w, seed):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 3, 2 * h, 2 * w, generator=generator)
    tokens = tokenizer.patchify(latents)
    assert tokens.shape == (batch, h * w, 12)
    assert torch.equal(tokenizer.unpatchify(tokens, h, w), latents)
    back = torch.randn(batch, h * w, 12, generator=generator)
    assert torch.equal(tokenizer.patchify(tokenizer.unpatchify(back, h, w)), back)


def test_patchify_feature_order_is_channel_then_row_then_column():
    latents = torch.arange(3 * 4 * 6, dtype=torch.float32).view(1, 3, 4, 6)
    tokens = tokenizer.patchify(latents)
    # token (row 1, col 2) covers latent rows 2-3, columns 4-5
    token = tokens[0, 1 * 3 + 2]
    expected = torch.stack([latents[0, c, 2 + p, 4 + q] for c in range(3) for p in range(2) for q in range(2)])
    assert torch.equal(token, expected)


def test_patchify_rejects_odd_sizes():
    with pytest.raises(ValueError, match="multiples of the patch size"):
        tokenizer.patchify(torch.zeros(1, 3, 3, 4))
    with pytest.raises(ValueError, match="grid"):
        tokenizer.unpatchify(torch.zeros(1, 5, 12), 2, 3)
    for width in (11, 8):  # 8 would reshape into 2 channels without a word
        with pytest.raises(ValueError, match=rf"tokens must have shape \(B, 6, 12\) for a 2x3 grid, found "
                                             rf"\(1, 6, {width}\)"):
            tokenizer.unpatchify(torch.zeros(1, 6, width), 2, 3)


def test_image_checks_name_what_they_found():
    assert tokenizer.grid_size(np.int64(32), torch.tensor(16)) == (8, 4)  # 4 pixels a token (f4, patch 2)
    for side in (True, 32.0):
        with pytest.raises(ValueError, match=rf"image width must be a positive multiple of 4 .*found "
                                             rf"{type(side).__name__}"):
            tokenizer.grid_size(32, side)
    with pytest.raises(ValueError, match="image height and width must be positive multiples of 2, found 0x16"):
        tokenizer.encode(torch.zeros(1, 3, 0, 16))
    with pytest.raises(ValueError, match=r"latents must have shape \(B, 3, h, w\) with h, w >= 1, "
                                         r"found \(1, 3, 0, 2\)"):
        tokenizer.decode(torch.zeros(1, 3, 0, 2))
    with pytest.raises(ValueError, match="images are torch.float64 but the encoder's weights torch.float32; cast"):
        tokenizer.encode(torch.zeros(1, 3, 16, 16, dtype=torch.float64))


@given(h=st.integers(1, 6), w=st.integers(1, 6), psz=st.sampled_from([1, 2]),
       constant=st.booleans(), seed=st.integers(0, 2**16))
def test_standardized_latents_have_zero_mean_unit_variance(h, w, psz, constant, seed):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 16, psz * h, psz * w, generator=generator) * 5 + 3
    if constant:
        latents = torch.full_like(latents, 0.7)
    out = standardize_channels(latents, psz)
    blocks = out.unfold(2, psz, psz).unfold(3, psz, psz)  # (B, C, h, w, p, q)
    blocks = blocks.permute(0, 2, 3, 1, 4, 5).flatten(3)
    torch.testing.assert_close(blocks.mean(-1), torch.zeros_like(blocks.mean(-1)), atol=1e-5, rtol=0)
    variance = blocks.var(-1, unbiased=False)
    if constant:  # eps keeps a constant vector at zero instead of dividing by zero
        assert torch.isfinite(out).all() and out.abs().max() < 1e-3
    else:
        torch.testing.assert_close(variance, torch.ones_like(variance), atol=1e-3, rtol=0)


def test_a_sampled_posterior_keeps_its_spread_around_the_standardised_mean():
    """NextStep-1's VAE standardises the posterior's mean and samples around it with the posterior's own
    spread; the scale and shift then apply to the sample, and decoding undoes them."""
    config = FluxVAEConfig(ch=8, ch_mult=(1, 1), num_res_blocks=1, norm_groups=4, deterministic=False,
                           scaling_factor=0.5, shift_factor=0.25)
    vae = FluxVAE(config).eval()
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        mean, logvar = vae.encode_moments(images)
        sampled = vae.encode(images, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(1))
    expected = (standardize_channels(mean) + torch.exp(0.5 * logvar) * noise - 0.25) * 0.5
    torch.testing.assert_close(sampled, expected)
    deterministic = FluxVAE(config.replace(deterministic=True))
    deterministic.load_state_dict(vae.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(deterministic.encode(images), (standardize_channels(mean) - 0.25) * 0.5)



def test_training_noise_is_added_at_the_scale_of_the_standardised_latents():
    """The release adds U(0, gamma) * eps to its posterior sample, before scale and shift: in the
    normalised latents the decoder reads, that is gamma * scaling_factor."""
    from nextstep.tokenizers.latent_normalization import perturb_latents

    vae = FluxVAE(FluxVAEConfig(ch=8, ch_mult=(1, 1), num_res_blocks=1, norm_groups=4, scaling_factor=0.25,
                                shift_factor=0.5)).eval()
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    read = []
    vae.decoder.register_forward_pre_hook(lambda module, inputs: read.append(inputs[0]))
    with torch.no_grad():
        vae(images, 0.2, torch.Generator().manual_seed(3))
        vae(images, 0.0)
        clean = vae.encode(images)
    standardised = clean / 0.25 + 0.5  # the latents before scale and shift
    noisy = perturb_latents(standardised, 0.2, torch.Generator().manual_seed(3))
    torch.testing.assert_close(read[0] - read[1], noisy - standardised, atol=1e-5, rtol=1e-5)


def test_a_sampled_reconstruction_draws_only_from_its_generator():
    vae = FluxVAE(FluxVAEConfig(ch=8, ch_mult=(1, 1), num_res_blocks=1, norm_groups=4, deterministic=False))
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        first = vae(images, 0.2, torch.Generator().manual_seed(3))
        torch.manual_seed(11)  # the global generator moves between the calls
        second = vae(images, 0.2, torch.Generator().manual_seed(3))
        assert torch.equal(first, second)
        state = torch.random.get_rng_state()
        seeded = vae.encode_seeded(images, 5)
        assert torch.equal(torch.random.get_rng_state(), state)  # the global state stays as it was
        assert torch.equal(seeded, vae.encode_seeded(images, 5))


def test_denormalising_inverts_the_scale_and_shift():
    from nextstep.tokenizers.latent_normalization import denormalize_latents, normalize_latents

    z = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    for method in ("scale_shift", "layer_norm"):
        normalised = (z - 0.25) * 0.5
        torch.testing.assert_close(denormalize_latents(normalised, method, scale=0.5, shift=0.25), z)
    torch.testing.assert_close(
        denormalize_latents(normalize_latents(z, "scale_shift", scale=0.5, shift=0.25), "scale_shift",
                            scale=0.5, shift=0.25), z)


def test_latents_of_another_channel_count_are_refused_before_they_become_tokens():
    vae = FluxVAE(FluxVAEConfig(ch=8, ch_mult=(1, 1), num_res_blocks=1, norm_groups=4))  # 16 channels
    with pytest.raises(ValueError, match="latents must have 16 channels, found 8"):
        vae.patchify(torch.zeros(1, 8, 4, 4))


def test_unpatchify_names_a_grid_side_that_is_not_an_integer():
    tokens = torch.zeros(1, 4, 12)
    with pytest.raises(ValueError, match="grid_height must be a positive integer, found float 2.0"):
        tokenizer.unpatchify(tokens, 2.0, 2)
    with pytest.raises(ValueError, match="grid_width must be a positive integer, found float 2.0"):
        tokenizer.unpatchify(tokens, 2, 2.0)
    assert tokenizer.unpatchify(tokens, np.int64(2), torch.tensor(2)).shape == (1, 3, 4, 4)


def test_decoding_latents_of_another_dtype_says_which():
    latents = torch.zeros(1, 3, 2, 2)
    with pytest.raises(ValueError, match="latents are torch.float64 but the decoder's weights torch.float32; cast"):
        tokenizer.decode(latents.double())
    with pytest.raises(ValueError, match="latents must be floating point, found torch.int64"):
        tokenizer.decode(latents.long())


def test_images_in_zero_one_pass_with_a_warning_naming_the_fix(caplog):
    vae = FluxVAE(FluxVAEConfig(ch=8, ch_mult=(1, 1), num_res_blocks=1, norm_groups=4))
    unit = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with caplog.at_level("WARNING", logger="nextstep.tokenizers.base"):
        vae.check_images(torch.zeros(1, 3, 8, 8))  # a constant image says nothing
        vae.check_images(unit * 2 - 1)
        assert not caplog.records
        vae.check_images(unit)
        vae.check_images(unit)  # once is enough
    assert len(caplog.records) == 1
    low, high = unit.min().item(), unit.max().item()
    assert caplog.records[0].getMessage() == (
        f"the images' values all lie in [{low:.2f}, {high:.2f}]; images are expected in [-1, 1] "
        "(x * 2 - 1 converts images in [0, 1])")


def test_layer_norm_standardises_then_shifts_then_scales():
    """``layer_norm`` gives ``(standardise(z) - shift) * scale``: the shift is subtracted before scaling."""
    from nextstep.tokenizers.latent_normalization import normalize_latents

    z = torch.tensor([1.0, 3.0])[None, :, None, None]  # one position, channel mean 2, variance 1
    out = normalize_latents(z, "layer_norm", scale=2.0, shift=0.5)
    # standardised (-1, 1) up to eps 1e-6; then (-1 - 0.5) * 2 and (1 - 0.5) * 2
    torch.testing.assert_close(out.flatten(), torch.tensor([-3.0, 1.0]), atol=1e-5, rtol=0)


def test_scale_shift_uses_flux_s_published_order_and_constants():
    """``scale_shift`` with FLUX.1's 0.3611 / 0.1159 maps z to ``(z - 0.1159) * 0.3611`` and back exactly."""
    from nextstep.tokenizers.latent_normalization import denormalize_latents, normalize_latents

    z = torch.tensor([0.1159, 1.1159, -0.8841])[None, :, None, None]
    out = normalize_latents(z, "scale_shift", scale=0.3611, shift=0.1159)
    torch.testing.assert_close(out.flatten(), torch.tensor([0.0, 0.3611, -0.3611]), atol=1e-6, rtol=0)
    torch.testing.assert_close(denormalize_latents(out, "scale_shift", scale=0.3611, shift=0.1159), z)


def test_an_unknown_normalisation_is_refused_both_ways():
    """normalize_latents and denormalize_latents refuse a method outside NORMALIZATIONS, naming it."""
    from nextstep.tokenizers.latent_normalization import denormalize_latents, normalize_latents

    z = torch.zeros(1, 2, 1, 1)
    for function in (normalize_latents, denormalize_latents):
        with pytest.raises(ValueError, match="unknown latent normalisation 'layernorm'"):
            function(z, "layernorm")


def test_two_by_two_standardisation_uses_contiguous_blocks():
    """With ``patch_size=2`` each 2x2 block of neighbouring positions is standardised over its C*4 values."""
    latents = torch.arange(1 * 2 * 4 * 4, dtype=torch.float32).view(1, 2, 4, 4) ** 1.5
    out = standardize_channels(latents, 2)
    for row in (0, 2):
        for column in (0, 2):
            block = latents[0, :, row:row + 2, column:column + 2]
            expected = (block - block.mean()) / torch.sqrt(block.var(unbiased=False) + 1e-6)
            torch.testing.assert_close(out[0, :, row:row + 2, column:column + 2], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("normalization", ["layer_norm", "scale_shift"])
def test_images_seeded_one_by_one_draw_the_same_latents_in_any_batch(normalization):
    vae = FluxVAE(FluxVAEConfig(ch=8, ch_mult=(1, 1), num_res_blocks=1, norm_groups=4, deterministic=False,
                                normalization=normalization))
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        together = vae.encode_seeded(images, [7, 8, 9])
        for row, seed in enumerate((7, 8, 9)):
            alone = vae.encode_seeded(images[row:row + 1], [seed])
            torch.testing.assert_close(alone[0], together[row], atol=1e-5, rtol=1e-5)
        pair = vae.encode_seeded(images[1:], [8, 9])
        torch.testing.assert_close(pair, together[1:], atol=1e-5, rtol=1e-5)
        generic = ImageTokenizer.encode_seeded(vae, images, [7, 8, 9])  # the default: one image at a time
        assert torch.equal(generic[2], ImageTokenizer.encode_seeded(vae, images[2:], [9])[0])
    with pytest.raises(ValueError, match=r"seed must be one int or one per image \(3\), found 2"):
        vae.encode_seeded(images, [1, 2])


def test_the_noise_of_a_reconstruction_is_scaled_only_where_the_latents_are():
    from nextstep.tokenizers import flux_vae

    asked = []
    images = torch.zeros(1, 3, 8, 8)
    for normalization, scale, expected in (("none", 0.25, 0.2), ("scale_shift", 0.25, 0.05),
                                           ("scale_shift", -0.5, 0.1)):
        vae = FluxVAE(FluxVAEConfig(ch=8, ch_mult=(1, 1), num_res_blocks=1, norm_groups=4,
                                    normalization=normalization, scaling_factor=scale))
        original = flux_vae.perturb_latents
        try:
            flux_vae.perturb_latents = lambda latents, gamma, generator=None: asked.append(gamma) or latents
            vae(images, 0.2)
        finally:
            flux_vae.perturb_latents = original
        assert asked[-1] == pytest.approx(expected)
    with pytest.raises(ValueError, match="gamma must be a number >= 0, found nan"):
        perturb_latents(torch.zeros(1, 2, 2, 2), float("nan"))


def test_sides_that_do_not_give_whole_standardisation_blocks_are_refused_by_their_pixels():
    vae = FluxVAE(FluxVAEConfig(ch=8, ch_mult=(1, 1), num_res_blocks=1, norm_groups=4, normalization="layer_norm",
                                normalization_patch_size=4))
    with pytest.raises(ValueError, match=r"image height must be a positive multiple of 8 \(VAE factor 2 x 4, the "
                                         r"least common multiple of the token patch 2 and the standardisation "
                                         r"block 4\), found 4"):
        vae.grid_size(4, 8)
    assert vae.grid_size(8, 16) == (2, 4)
    for name in ("in_channels", "out_channels"):
        with pytest.raises(ValueError, match=rf"{name} must be 3 \(images are RGB throughout the library\)"):
            FluxVAEConfig(**{name: 1})
