"""Properties of the tokenizer's latents, drawn by Hypothesis over image batches."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nextstep.tokenizers import FluxVAE, FluxVAEConfig, perturb_latents

torch.manual_seed(0)
VAE = FluxVAE(FluxVAEConfig(ch=8, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=4)).eval()
with torch.no_grad():
    for parameter in VAE.parameters():  # random, non-degenerate weights
        parameter.add_(torch.randn_like(parameter) * 0.05)


@st.composite
def image_batches(draw):
    batch = draw(st.integers(1, 3))
    height = 8 * draw(st.integers(1, 5))
    width = 8 * draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**16))
    kind = draw(st.sampled_from(["uniform", "constant", "extreme"]))
    generator = torch.Generator().manual_seed(seed)
    if kind == "constant":
        values = torch.rand(batch, 3, 1, 1, generator=generator) * 2 - 1
        return values.expand(batch, 3, height, width).contiguous()
    if kind == "extreme":
        return torch.randint(0, 2, (batch, 3, height, width), generator=generator).float() * 2 - 1
    return torch.rand(batch, 3, height, width, generator=generator) * 2 - 1


@given(images=image_batches())
def test_normalised_latents_are_standardised_per_position(images):
    with torch.no_grad():
        latents = VAE.encode(images)
        raw, _ = VAE.encode_moments(images)
    assert latents.shape == (images.shape[0], 16, images.shape[2] // 8, images.shape[3] // 8)
    mean = latents.mean(1)
    variance = latents.var(1, unbiased=False)
    raw_variance = raw.var(1, unbiased=False)
    torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-5, rtol=0)
    # LayerNorm divides by sqrt(var + eps): variance is var / (var + eps), so exactly 1 only when var >> eps.
    expected = raw_variance / (raw_variance + 1e-6)
    torch.testing.assert_close(variance, expected, atol=1e-4, rtol=1e-4)


@given(images=image_batches())
def test_encoding_is_independent_across_the_batch(images):
    with torch.no_grad():
        together_raw, _ = VAE.encode_moments(images)
        alone_raw = torch.cat([VAE.encode_moments(images[i:i + 1])[0] for i in range(images.shape[0])])
        together = VAE.encode(images)
        alone = torch.cat([VAE.encode(images[i:i + 1]) for i in range(images.shape[0])])
    torch.testing.assert_close(together_raw, alone_raw, atol=1e-5, rtol=1e-5)
    # Normalising divides by each position's spread over channels, which scales rounding
    # differences between batched and single convolutions by 1 / std.
    spread = together_raw.std(1, unbiased=False, keepdim=True)
    assert ((together - alone).abs() <= 1e-5 + 2e-5 / spread).all()


@given(images=image_batches())
def test_round_trip_keeps_the_shape(images):
    with torch.no_grad():
        assert VAE.decode(VAE.encode(images)).shape == images.shape


@given(gamma=st.floats(0.0, 1.0), seed=st.integers(0, 2**16), batch=st.integers(1, 4))
def test_perturbation_is_bounded_by_gamma_times_noise(gamma, seed, batch):
    latents = torch.randn(batch, 16, 3, 5)
    perturbed = perturb_latents(latents, gamma, torch.Generator().manual_seed(seed))
    generator = torch.Generator().manual_seed(seed)
    strength = torch.rand(batch, 1, 1, 1, generator=generator)
    eps = torch.randn(latents.shape, generator=generator)
    delta = perturbed - latents
    assert (delta.abs() <= gamma * eps.abs() + 1e-6).all()
    if gamma > 0:
        # one strength a ~ U(0, 1) per sample scales that sample's noise
        torch.testing.assert_close(delta, gamma * strength * eps)


def test_negative_gamma_is_an_error():
    with pytest.raises(ValueError, match="gamma"):
        perturb_latents(torch.zeros(1, 16, 2, 2), -0.1)


def test_a_sampled_posterior_spreads_around_its_mean_with_the_posteriors_standard_deviation():
    """``deterministic=False`` draws ``mean + exp(logvar / 2) * eps``: the spread is the standard deviation
    exp(logvar / 2), not the variance exp(logvar)."""
    import math

    config = FluxVAEConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4, z_channels=4)
    torch.manual_seed(0)
    deterministic = FluxVAE(config).eval()
    with torch.no_grad():  # log-variance -3 at every position: standard deviation exp(-1.5), about 0.22
        deterministic.encoder.conv_out.weight[4:] = 0.0
        deterministic.encoder.conv_out.bias[4:] = -3.0
    sampled = FluxVAE(config.replace(deterministic=False)).eval()
    sampled.load_state_dict(deterministic.state_dict())
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        _, logvar = sampled.encode_moments(images)
        assert torch.equal(logvar, torch.full_like(logvar, -3.0))
        draws = sampled.encode(images, torch.Generator().manual_seed(1)) - deterministic.encode(images)
        again = sampled.encode(images, torch.Generator().manual_seed(1)) - deterministic.encode(images)
    assert torch.equal(draws, again)  # the generator is the source of the draw
    assert abs(float(draws.mean())) < 0.02
    assert abs(float(draws.std()) - math.exp(-1.5)) < 0.02
