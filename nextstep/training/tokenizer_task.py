"""`TokenizerTask`: training the image tokenizer (reconstruction + perceptual loss under latent noise)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from nextstep.evaluation.image_metrics import psnr
from nextstep.images import to_pil
from nextstep.tokenizers.flux_vae import FluxVAE
from nextstep.tokenizers.training_loss import TokenizerLoss
from nextstep.training.data.base import ImageTextBatch
from nextstep.training.task import StepResult, TrainingTask


class TokenizerTask(TrainingTask):
    """Trains a `FluxVAE` on image batches with a `TokenizerLoss`.

    Args:
        model: the VAE.
        objective: the loss (weights, noise level, perceptual network).
        train_encoder: False freezes the encoder and trains only the decoder (the
            NextStep-1 release fine-tuned its decoder this way).
        preview_images: (K, 3, H, W) fixed images whose reconstructions form the
            periodic sample grid (originals on top).
    """

    def __init__(self, model: FluxVAE, objective: TokenizerLoss, *, train_encoder: bool = True,
                 preview_images: torch.Tensor | None = None):
        super().__init__(model)
        model.encoder.requires_grad_(train_encoder)
        model.decoder.requires_grad_(True)
        self.objective = objective
        self.preview_images = preview_images
        self._objective_device: torch.device | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def loss(self, module: nn.Module, batch: ImageTextBatch, generator: torch.Generator) -> StepResult:
        if batch.images is None:
            raise ValueError("tokenizer training needs image batches; this batch holds cached tokens only")
        images = batch.images.to(self.device)
        if self._objective_device != images.device:  # the perceptual network goes where the tokenizer is
            self.objective.to(images.device)
            self._objective_device = images.device
        out = self.objective(module, images, generator)
        pixels = images.shape[0] * images.shape[-2] * images.shape[-1]
        metrics = {"l1": float(out.l1.detach()), "mse": float(out.mse.detach()),
                   "perceptual": float(out.perceptual.detach()),
                   "psnr_noisy": float(10 * torch.log10(4.0 / out.mse.detach().clamp(min=1e-12)))}
        return StepResult(loss=out.total, metrics=metrics, num_tokens=pixels)

    def sample_images(self, **_: Any) -> list[Image.Image]:
        if self.preview_images is None:
            return []
        images = self.preview_images.to(self.device)
        with torch.no_grad():
            reconstructions = self.model(images).float().clamp(-1, 1)
        return to_pil(torch.cat([images, reconstructions]).cpu())

    @torch.no_grad()
    def preview_psnr(self) -> float:
        """Mean PSNR (dB) of the noise-free reconstructions of the preview images."""
        if self.preview_images is None:
            raise ValueError("no preview images were given")
        images = self.preview_images.to(self.device)
        return float(psnr(self.model(images), images).mean())

    def write_checkpoint_files(self, directory: Path) -> None:
        # config.json beside model.safetensors: the checkpoint loads with load_flux_vae.
        self.model.config.save(directory / "config.json")
