"""The FLUX.1 VAE's layers and config: posterior moments, group norms, sampling layers and the decoder's width."""

import pytest
import torch
from torch import nn

from nextstep.tokenizers import FluxVAE, FluxVAEConfig
from nextstep.tokenizers.flux_vae import AttnBlock, Downsample, Upsample

SMALL = FluxVAEConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4, z_channels=3, normalization="none")


def _constant_moments(vae: FluxVAE, mean: float, logvar: float) -> None:
    """Make the encoder output ``mean`` in its first C channels and ``logvar`` in its last C, everywhere."""
    conv = vae.encoder.conv_out
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias[: vae.latent_channels] = mean
        conv.bias[vae.latent_channels:] = logvar


@pytest.mark.parametrize(("raw", "clamped"), [(25.0, 20.0), (-45.0, -30.0), (3.5, 3.5), (-12.0, -12.0)])
def test_the_posterior_log_variance_is_clamped_to_minus_30_and_20(raw, clamped):
    """encode_moments returns the first C channels as the mean and the last C, clamped to [-30, 20], as logvar."""
    torch.manual_seed(0)
    vae = FluxVAE(SMALL).eval()
    _constant_moments(vae, 0.75, raw)
    with torch.no_grad():
        mean, logvar = vae.encode_moments(torch.zeros(1, 3, 8, 8))
    assert mean.shape == logvar.shape == (1, 3, 4, 4)
    torch.testing.assert_close(mean, torch.full_like(mean, 0.75))
    torch.testing.assert_close(logvar, torch.full_like(logvar, clamped))


def test_every_group_norm_has_flux_s_eps_and_the_configured_groups():
    """GroupNorms are affine with eps 1e-6; the encoder's have norm_groups groups, the decoder's decoder_groups."""
    vae = FluxVAE(SMALL.replace(decoder_ch=16, decoder_norm_groups=8))
    for part, groups in ((vae.encoder, 4), (vae.decoder, 8)):
        norms = [m for m in part.modules() if isinstance(m, nn.GroupNorm)]
        assert norms and all(n.num_groups == groups and n.eps == 1e-6 and n.affine for n in norms)


def test_the_decoder_is_built_decoder_ch_wide_and_the_encoder_ch_wide():
    """decoder_ch sets the decoder's base width (its deepest level ch_mult[-1] times it); ch keeps the encoder's."""
    vae = FluxVAE(SMALL.replace(decoder_ch=16, decoder_norm_groups=8))
    assert vae.decoder.conv_in.out_channels == 16 * 2 and vae.decoder.conv_out.in_channels == 16
    assert vae.encoder.conv_in.out_channels == 8 and vae.encoder.conv_out.in_channels == 8 * 2
    assert vae.decode(torch.zeros(1, 3, 2, 2)).shape == (1, 3, 4, 4)


def test_decoder_groups_that_do_not_divide_the_decoder_widths_are_refused():
    """Every decoder level width must divide by decoder_norm_groups; the config names the widths."""
    with pytest.raises(ValueError, match=r"decoder_norm_groups must be a divisor of every decoder level width "
                                         r"\[12, 24\], found 8"):
        SMALL.replace(decoder_ch=12, decoder_norm_groups=8)


def test_a_zero_scaling_factor_is_refused():
    """scaling_factor divides the latents on decoding, so 0 is refused."""
    with pytest.raises(ValueError, match="scaling_factor must be non-zero, found 0"):
        SMALL.replace(scaling_factor=0.0)


def test_decoding_hands_the_decoder_the_latents_with_scale_and_shift_undone():
    """decode(z) feeds the decoder network ``z / scaling_factor + shift_factor``."""
    vae = FluxVAE(SMALL.replace(normalization="scale_shift", scaling_factor=0.25, shift_factor=0.5)).eval()
    read = []
    vae.decoder.register_forward_pre_hook(lambda module, inputs: read.append(inputs[0]))
    z = torch.tensor([-1.0, 0.0, 2.0])[None, :, None, None].expand(1, 3, 2, 2)
    with torch.no_grad():
        vae.decode(z)
    torch.testing.assert_close(read[0][0, :, 0, 0], torch.tensor([-3.5, 0.5, 8.5]))


def test_the_latent_grid_is_the_image_over_two_to_the_number_of_downsamplings():
    """len(ch_mult) levels downsample len(ch_mult) - 1 times: f = 2**(levels - 1)."""
    for ch_mult, factor in (((1,), 1), ((1, 2), 2), ((1, 2, 2), 4)):
        vae = FluxVAE(SMALL.replace(ch_mult=ch_mult))
        assert vae.downsample == factor
        assert vae.encode(torch.zeros(1, 3, 16, 8)).shape == (1, 3, 16 // factor, 8 // factor)


def test_downsampling_pads_only_the_right_and_bottom_edges():
    """Downsample is a stride-2 3x3 conv over the input padded by one zero row/column at the bottom/right."""
    layer = Downsample(1)
    x = torch.arange(1.0, 17.0).view(1, 1, 4, 4)
    with torch.no_grad():
        layer.conv.bias.zero_()
        layer.conv.weight.zero_()
        layer.conv.weight[0, 0, 0, 0] = 1.0  # top-left tap reads x[2i, 2j]
        torch.testing.assert_close(layer(x), x[:, :, ::2, ::2])
        layer.conv.weight.zero_()
        layer.conv.weight[0, 0, 2, 2] = 1.0  # bottom-right tap reads x[2i + 2, 2j + 2], zero past the edge
        expected = torch.tensor([[11.0, 0.0], [0.0, 0.0]]).view(1, 1, 2, 2)
        torch.testing.assert_close(layer(x), expected)


def test_upsampling_repeats_each_position_in_a_2x2_block():
    """Upsample is nearest-neighbour x2 then a 3x3 conv: a centre-tap conv returns each value 2x2 times."""
    layer = Upsample(1)
    x = torch.tensor([[1.0, 2.0], [3.0, 5.0]]).view(1, 1, 2, 2)
    with torch.no_grad():
        layer.conv.bias.zero_()
        layer.conv.weight.zero_()
        layer.conv.weight[0, 0, 1, 1] = 1.0
        torch.testing.assert_close(layer(x), x.repeat_interleave(2, 2).repeat_interleave(2, 3))


def test_spatial_attention_is_single_head_softmax_attention_over_all_positions():
    """AttnBlock(x) = x + proj_out(softmax(q k^T / sqrt(C)) v) over the h*w positions, on group-normed x."""
    torch.manual_seed(0)
    block = AttnBlock(4, 2).eval()
    x = torch.randn(2, 4, 2, 3)
    with torch.no_grad():
        h = block.norm(x).flatten(2)  # (B, C, h*w), row-major positions
        q, k, v = (torch.einsum("oc,bcn->bon", p.weight[:, :, 0, 0], h) + p.bias[None, :, None]
                   for p in (block.q, block.k, block.v))
        weights = torch.softmax(torch.einsum("bcn,bcm->bnm", q, k) / 2.0, dim=-1)  # sqrt(C) = 2
        attended = torch.einsum("bnm,bcm->bcn", weights, v)
        out = torch.einsum("oc,bcn->bon", block.proj_out.weight[:, :, 0, 0], attended) \
            + block.proj_out.bias[None, :, None]
        torch.testing.assert_close(block(x), x + out.view(2, 4, 2, 3), atol=1e-5, rtol=1e-5)
