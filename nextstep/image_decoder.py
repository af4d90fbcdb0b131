"""Give a trained model a better image decoder without touching its latent space.

A decoder fine-tuned with its encoder frozen (a tokenizer recipe with
``"train_encoder": false``) reads the very latents the generator was trained to
produce, so it can replace the model's decoder as is: sharper images, the same
generator. `replace_image_decoder` checks that promise (same tokenizer config
apart from the decoder's own width, bit-identical encoder) before it copies
anything. The new decoder may be wider (`nextstep.tokenizers.decoder_widening`).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch

from nextstep.tokenizers.flux_vae import DECODER_FIELDS, FluxVAE

if TYPE_CHECKING:
    from nextstep.model import NextStep


@torch.no_grad()
def replace_image_decoder(model: NextStep, tokenizer: FluxVAE) -> NextStep:
    """Copy ``tokenizer``'s decoder into ``model``'s image tokenizer, in place; returns the model.

    Args:
        model: a `NextStep` whose image tokenizer is a `FluxVAE`.
        tokenizer: a `FluxVAE` with the same config (its decoder may be wider)
            whose encoder is the model's (typically the model's tokenizer after
            a decoder-only fine-tune).

    Raises:
        ValueError: the configs differ (naming the first differing field) or an
            encoder weight differs (naming the key), i.e. the latent spaces may differ.
    """
    current = model.image_tokenizer
    if not isinstance(current, FluxVAE) or not isinstance(tokenizer, FluxVAE):
        raise ValueError(f"expected two FluxVAE image tokenizers, found {type(current).__name__} in the model "
                         f"and {type(tokenizer).__name__} given")
    ours, theirs = current.config.to_dict(), tokenizer.config.to_dict()
    for field in ours:
        if field not in DECODER_FIELDS and ours[field] != theirs.get(field):
            raise ValueError(f"the tokenizers' configs differ at {field!r}: the model has {ours[field]!r}, "
                             f"the new decoder's tokenizer {theirs.get(field)!r}")
    new_encoder = tokenizer.encoder.state_dict()
    for key, value in current.encoder.state_dict().items():
        other = new_encoder[key]
        if other.shape != value.shape or not torch.equal(other.to(value), value):
            raise ValueError(f"encoder weight encoder.{key} differs from the model's: the new decoder was not "
                             "trained on this model's latents (fine-tune it with train_encoder false)")
    reference = next(current.encoder.parameters())
    current.decoder = copy.deepcopy(tokenizer.decoder).to(device=reference.device, dtype=reference.dtype)
    current.decoder.requires_grad_(reference.requires_grad).train(current.training)
    current.config = current.config.replace(**{field: getattr(tokenizer.config, field) for field in DECODER_FIELDS})
    return model
