"""Tokenizer recipes: train a `FluxVAE` with the generic `Trainer`, then evaluate it.

A recipe looks like::

    {
      "tokenizer": "tiny",
      "tokenizer_config": {"ch": 16, "ch_mult": [1, 2, 4, 8]},
      "loss": {"l1_weight": 1.0, "mse_weight": 1.0, "perceptual_weight": 0.1, "noise_gamma": 0.2},
      "data": {"datasets": [{"type": "photo_crops", "num_samples": 100000, "size": 64}], "resolution": 64},
      "train": {"max_steps": 3000, "micro_batch_size": 16, "learning_rate": 1e-3, "warmup_steps": 100}
    }

``nextstep train-tokenizer RECIPE`` runs it; the output folder gets the usual
logs and checkpoints, the final tokenizer in ``tokenizer/`` (EMA weights when the
run keeps an average) and the held-out evaluation in ``eval/``.
"""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nextstep.config import Config, require
from nextstep.io import names_a_path
from nextstep.tokenizers.training_loss import TokenizerLoss, TokenizerLossConfig
from nextstep.training.config import TrainConfig
from nextstep.training.data.source import DataConfig
from nextstep.training.recipe import EVALUATION_DIR, TOKENIZER_DIR

logger = logging.getLogger("nextstep.training")

PERCEPTUAL_NETWORKS = ("efficientnet_lite0", "none")


@dataclass
class TokenizerRecipeConfig(Config):
    """A tokenizer training run.

    Args:
        tokenizer: a VAE preset (``tiny``, ``flux``) or a checkpoint in any layout to fine-tune.
        tokenizer_config: `FluxVAEConfig` fields that override the preset or checkpoint's.
        seed: seed of a preset's random initialisation (and of a widened decoder's new channels).
        decoder_ch: widen the starting tokenizer's decoder to this base width
            before training, keeping what it draws (`widen_decoder`; 0 keeps it as is).
        train_encoder: False trains the decoder only (encoder frozen).
        loss: weights and latent noise level.
        perceptual_network: ``efficientnet_lite0`` or ``none``.
        perceptual_weights: optional local file of LPIPS-style per-channel weights.
        evaluation_crops: held-out crops evaluated after training (0 skips it).
        evaluation_size: side in pixels of the evaluation crops.
        data: the training images.
        train: optimiser, schedule, batch, logging and checkpoints.
    """

    tokenizer: str = "tiny"
    tokenizer_config: dict = field(default_factory=dict)
    seed: int = 0
    decoder_ch: int = 0
    train_encoder: bool = True
    loss: TokenizerLossConfig = field(default_factory=TokenizerLossConfig)
    perceptual_network: str = "efficientnet_lite0"
    perceptual_weights: str = ""
    evaluation_crops: int = 256
    evaluation_size: int = 64
    data: DataConfig = field(default_factory=lambda: DataConfig(datasets=({"type": "photo_crops"},)))
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        require(isinstance(self.tokenizer, str) and bool(self.tokenizer.strip()), "tokenizer", self.tokenizer,
                "a tokenizer preset's name or a VAE checkpoint's path")
        require(self.perceptual_network in PERCEPTUAL_NETWORKS, "perceptual_network", self.perceptual_network,
                f"one of {list(PERCEPTUAL_NETWORKS)}")
        require(self.decoder_ch >= 0, "decoder_ch", self.decoder_ch, ">= 0 (0: keep the decoder's width)")
        require(self.evaluation_crops >= 0, "evaluation_crops", self.evaluation_crops, ">= 0")
        require(self.evaluation_size >= 8 and self.evaluation_size % 8 == 0, "evaluation_size",
                self.evaluation_size, "a positive multiple of 8")
        require(self.loss.perceptual_weight == 0 or self.perceptual_network != "none", "perceptual_network",
                self.perceptual_network, "a network when loss.perceptual_weight > 0")
        require(not self.data.latent_cache, "data.latent_cache", self.data.latent_cache,
                "empty: a tokenizer trains on images, not on cached tokens")


def load_tokenizer_recipe(name_or_path: str, overrides: list[str] | None = None) -> TokenizerRecipeConfig:
    """Read a tokenizer recipe (a path or a name in ``recipes/``) and apply ``section.key=value`` overrides."""
    from nextstep.training.recipe import apply_overrides, find_recipe

    path = find_recipe(name_or_path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"recipe {path} is not valid JSON: {error}") from error
    except UnicodeDecodeError as error:
        raise ValueError(f"recipe {path} is not UTF-8 text, as a recipe is: {error}") from error
    return TokenizerRecipeConfig.from_dict(apply_overrides(data, overrides or []))


def build_recipe_tokenizer(recipe: TokenizerRecipeConfig):
    """The `FluxVAE` a recipe starts from (its decoder widened when the recipe asks)."""
    from nextstep.presets import flux_vae_config
    from nextstep.tokenizers.decoder_widening import widen_decoder
    from nextstep.tokenizers.flux_vae import FluxVAE
    from nextstep.tokenizers.vae_checkpoints import load_flux_vae

    if Path(recipe.tokenizer).exists() or names_a_path(recipe.tokenizer):  # a path: loaded, or named as missing
        tokenizer = load_flux_vae(recipe.tokenizer, **recipe.tokenizer_config)
    else:
        config = flux_vae_config(recipe.tokenizer)
        if recipe.tokenizer_config:
            config = config.replace(**{k: tuple(v) if isinstance(v, list) else v
                                       for k, v in recipe.tokenizer_config.items()})
        torch.manual_seed(recipe.seed)
        tokenizer = FluxVAE(config)
    if recipe.decoder_ch and recipe.decoder_ch != tokenizer.config.decoder_width:
        tokenizer = widen_decoder(tokenizer, recipe.decoder_ch, seed=recipe.seed)
    return tokenizer


def build_objective(recipe: TokenizerRecipeConfig) -> TokenizerLoss:
    perceptual = None
    if recipe.loss.perceptual_weight > 0:
        from nextstep.tokenizers.perceptual import EfficientNetLiteFeatures, PerceptualLoss

        perceptual = PerceptualLoss(EfficientNetLiteFeatures(), recipe.perceptual_weights or None)
    return TokenizerLoss(recipe.loss, perceptual)


def checkpoint_tokenizer(checkpoint: str | Path, recipe: TokenizerRecipeConfig, *, use_ema: bool):
    """The whole tokenizer a checkpoint of ``recipe``'s run holds, and its weight average
    (an `ExponentialMovingAverage` over the weights the recipe trains) when ``use_ema``, else None.

    Raises:
        FileNotFoundError: ``use_ema`` and the checkpoint has no average.
    """
    from nextstep.tokenizers.vae_checkpoints import load_flux_vae
    from nextstep.training.checkpointing import read_checkpoint_average
    from nextstep.training.ema import ExponentialMovingAverage

    tokenizer = load_flux_vae(checkpoint)
    if not use_ema:
        return tokenizer, None
    averages = read_checkpoint_average(checkpoint)
    tokenizer.encoder.requires_grad_(recipe.train_encoder)  # the average covers what the recipe trains
    return tokenizer, ExponentialMovingAverage.holding(tokenizer, averages)  # names and shapes checked


#: Tokenizer recipe fields a resumed run must share with the run it continues (see
#: `nextstep.training.recipe.check_resumable`).
RESUMED_TOKENIZER_FIELDS = ("tokenizer", "tokenizer_config", "seed", "decoder_ch", "train_encoder", "loss",
                            "perceptual_network", "perceptual_weights", "data")


def run_tokenizer_recipe(recipe: TokenizerRecipeConfig, output_dir: str | Path, *, resume: bool = True,
                         show_progress: bool = True):
    """Train, save the final tokenizer to ``output_dir/tokenizer`` and evaluate it; returns the `Trainer`."""
    from nextstep.evaluation.tokenizer_report import held_out_crops, run_tokenizer_evaluation
    from nextstep.tokenizers.vae_checkpoints import save_flux_vae
    from nextstep.training.checkpointing import is_sharded
    from nextstep.training.data.source import TrainingData, build_datasets, combine
    from nextstep.training.distributed import DistributedContext
    from nextstep.training.recipe import EARLIER_RUN_OUTPUTS, open_run_folder
    from nextstep.training.tokenizer_task import TokenizerTask
    from nextstep.training.trainer import LOG_FILE, RUN_ENTRIES, SAMPLES_DIR, Trainer, set_aside_earlier_run

    output_dir = Path(output_dir)
    context = DistributedContext.from_environment()
    try:
        tokenizer = build_recipe_tokenizer(recipe)
        datasets, repeats = build_datasets(recipe.data)
        data = TrainingData(combine(datasets, repeats), recipe.data.buckets(tokenizer.pixels_per_token))
        if context.is_main and not resume:  # starting over: the earlier run's recipe and outputs go aside too
            set_aside_earlier_run(output_dir, RUN_ENTRIES + EARLIER_RUN_OUTPUTS)
        preview = held_out_crops(8, recipe.evaluation_size, seed=99)
        task = TokenizerTask(tokenizer, build_objective(recipe), train_encoder=recipe.train_encoder,
                             preview_images=preview)
        trainer = Trainer(task, data, recipe.train, output_dir, context=context, show_progress=show_progress)
        open_run_folder(trainer, recipe, resume=resume, run_entries=(LOG_FILE, SAMPLES_DIR, TOKENIZER_DIR),
                        fields=RESUMED_TOKENIZER_FIELDS)
        if context.is_main:
            logger.info("training on %s", data.describe())
        trainer.fit(resume=resume)
        if context.is_main:
            average = trainer.ema
            if is_sharded(tokenizer):  # FSDP: the last checkpoint holds the whole tokenizer
                tokenizer, average = checkpoint_tokenizer(trainer.checkpoints.latest(), recipe,
                                                          use_ema=average is not None)
            tokenizer.eval()
            averaged = average.applied_to(tokenizer) if average is not None else nullcontext(tokenizer)
            with averaged:
                save_flux_vae(tokenizer, output_dir / TOKENIZER_DIR)
                if recipe.evaluation_crops:
                    report = run_tokenizer_evaluation(tokenizer, output_dir / EVALUATION_DIR,
                                                      count=recipe.evaluation_crops, size=recipe.evaluation_size)
                    logger.info("held-out PSNR %.2f dB, SSIM %.4f (report: %s)", report.psnr, report.ssim,
                                output_dir / EVALUATION_DIR / "report.md")
        return trainer
    finally:
        context.shutdown()

