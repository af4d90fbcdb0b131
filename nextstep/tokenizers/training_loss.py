"""The tokenizer's training objective: reconstruction + perceptual loss under latent noise.

``x_hat = decode(perturb(encode(x), gamma))`` and

``loss = l1_weight * |x_hat - x| + mse_weight * (x_hat - x)^2 + perceptual_weight * P(x_hat, x)``

where ``perturb`` adds ``U(0, gamma) * N(0, I)`` noise per sample (NextStep-1's
noise regularisation, gamma 0.2) to the normalised latents.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nextstep.config import Config, require


@dataclass
class TokenizerLossConfig(Config):
    """Weights of the tokenizer objective.

    Args:
        l1_weight: weight of the mean absolute error.
        mse_weight: weight of the mean squared error.
        perceptual_weight: weight of the perceptual distance (0 disables it).
        noise_gamma: largest latent noise scale (0 disables the regularisation).
    """

    l1_weight: float = 1.0
    mse_weight: float = 1.0
    perceptual_weight: float = 0.1
    noise_gamma: float = 0.2

    def validate(self) -> None:
        for name in ("l1_weight", "mse_weight", "perceptual_weight", "noise_gamma"):
            require(getattr(self, name) >= 0, name, getattr(self, name), ">= 0")


@dataclass
class TokenizerLossOutput:
    """Scalars of one batch: ``total`` and its parts."""

    total: torch.Tensor
    l1: torch.Tensor
    mse: torch.Tensor
    perceptual: torch.Tensor


class TokenizerLoss(nn.Module):
    """Computes `TokenizerLossOutput` for a tokenizer on a batch of images.

    Args:
        config: loss weights and noise level.
        perceptual: a perceptual distance ``(x_hat, x) -> (B,)``; required when
            ``perceptual_weight > 0``.
    """

    def __init__(self, config: TokenizerLossConfig, perceptual: nn.Module | None = None):
        super().__init__()
        if config.perceptual_weight > 0 and perceptual is None:
            raise ValueError("perceptual_weight > 0 needs a perceptual network; pass one or set the weight to 0")
        self.config = config
        self.perceptual = perceptual

    def forward(self, tokenizer: nn.Module, images: torch.Tensor,
                generator: torch.Generator | None = None) -> TokenizerLossOutput:
        """images (B, 3, H, W) in [-1, 1] -> losses.

        Args:
            tokenizer: called as ``tokenizer(images, noise_gamma, generator)`` for the
                reconstruction (a `FluxVAE`, or a DDP/FSDP wrapper of one).
            images: (B, 3, H, W) in [-1, 1].
            generator: source of the latent noise.
        """
        reconstruction = tokenizer(images, self.config.noise_gamma, generator)
        difference = reconstruction.float() - images.float()
        l1 = difference.abs().mean()
        mse = difference.pow(2).mean()
        perceptual = l1.new_zeros(())
        if self.config.perceptual_weight > 0:
            perceptual = self.perceptual(reconstruction, images).mean()
        total = (self.config.l1_weight * l1 + self.config.mse_weight * mse
                 + self.config.perceptual_weight * perceptual)
        return TokenizerLossOutput(total, l1, mse, perceptual)
