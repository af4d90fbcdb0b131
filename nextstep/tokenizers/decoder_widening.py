"""Widen a trained VAE decoder without changing what it draws.

A decoder is the part of the image tokenizer that can grow after the generator
is trained: the generator only ever sees the encoder's latents. `widen_decoder`
builds a decoder ``decoder_ch / ch`` times wider whose output equals the old
one's (up to float rounding), so a decoder-only fine-tune of the wider decoder
starts where the old one stopped instead of from scratch.

How the function is kept, tensor by tensor (old channels first, new after):

* every convolution keeps its old block; weights from new input channels into
  old output channels are zero, so old channels never see the new ones, and
  weights into new output channels start random (they are free to learn);
* GroupNorm keeps its channels per group (the groups grow with the width), so
  every old group holds exactly the channels it held before;
* spatial attention: the query's new channels start at zero, so the new
  channels add nothing to the attention logits, and the old query is scaled by
  ``sqrt(new width / old width)`` to undo the change of the softmax scale
  ``1 / sqrt(width)``.

The encoder is copied unchanged, so the latents are bit-identical.

Legend: O/I output/input channels of a convolution, k its kernel side.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from nextstep.tokenizers.flux_vae import FluxVAE


def widened_config(tokenizer: FluxVAE, decoder_ch: int):
    """``tokenizer``'s config with the decoder ``decoder_ch`` wide and its groups scaled alike.

    Raises:
        ValueError: ``decoder_ch`` is narrower than the current decoder, or the
            scaled group count is not a whole number.
    """
    config = tokenizer.config
    width, groups = config.decoder_width, config.decoder_groups
    if decoder_ch < width:
        raise ValueError(f"decoder_ch must be at least the current decoder width {width}, found {decoder_ch}")
    new_groups = Fraction(groups * decoder_ch, width)
    if new_groups.denominator != 1:
        raise ValueError(f"decoder_ch {decoder_ch} must keep {width // math.gcd(width, groups)}-channel steps "
                         f"so that each of the {groups} GroupNorm groups keeps its channels; "
                         f"{groups} * {decoder_ch} / {width} = {float(new_groups):g} groups is not whole")
    return config.replace(decoder_ch=decoder_ch, decoder_norm_groups=int(new_groups))


@torch.no_grad()
def widen_decoder(tokenizer: FluxVAE, decoder_ch: int, *, seed: int = 0) -> FluxVAE:
    """A new `FluxVAE` with ``tokenizer``'s encoder and a ``decoder_ch``-wide decoder drawing the same images.

    Args:
        tokenizer: the trained VAE (left unchanged).
        decoder_ch: the new decoder base width (>= the current one; widths and
            GroupNorm groups grow by the same factor).
        seed: seed of the new channels' random initial weights.
    """
    config = widened_config(tokenizer, decoder_ch)
    reference = next(tokenizer.parameters())
    with torch.random.fork_rng(devices=[]):  # the caller's random state stays as it was
        torch.manual_seed(seed)
        wide = FluxVAE(config).to(device=reference.device, dtype=reference.dtype)
    wide.encoder.load_state_dict(tokenizer.encoder.state_dict())
    old = tokenizer.decoder.state_dict()
    scale = math.sqrt(config.decoder_width / tokenizer.config.decoder_width)
    for name, new in wide.decoder.state_dict().items():
        _embed(new, old[name])
        if name.endswith(".q.weight") or name.endswith(".q.bias"):
            new[old[name].shape[0]:] = 0
            new[: old[name].shape[0]] *= scale
    return wide.train(tokenizer.training)


def _embed(new: torch.Tensor, old: torch.Tensor) -> None:
    """Write ``old`` into the leading block of ``new`` in place; zero what reads new inputs into old outputs.

    ``new``/``old``: a conv weight (O, I, k, k), or a bias / norm vector (O,).
    """
    if new.ndim != old.ndim or any(n < o for n, o in zip(new.shape, old.shape)):
        raise ValueError(f"cannot widen a tensor of shape {tuple(old.shape)} into {tuple(new.shape)}")
    out_channels = old.shape[0]
    if old.ndim == 4:
        in_channels = old.shape[1]
        new[:out_channels, :in_channels] = old
        new[:out_channels, in_channels:] = 0
    else:
        new[:out_channels] = old
