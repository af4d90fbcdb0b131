"""Training: a generic loop (`Trainer`) over a loss (`TrainingTask`), data pipelines,
checkpoints with exact resume, and DDP / FSDP2 under ``torchrun``.
"""

from nextstep.training.checkpointing import CheckpointManager
from nextstep.training.config import TrainConfig
from nextstep.training.data import (
    AspectRatioBuckets,
    DataConfig,
    TrainingData,
    build_latent_cache,
    build_training_data,
)
from nextstep.training.distributed import DistributedContext
from nextstep.training.ema import ExponentialMovingAverage
from nextstep.training.optim import WarmupCosineSchedule, build_optimizer
from nextstep.training.recipe import RecipeConfig, load_recipe, run_recipe
from nextstep.training.task import StepResult, TrainingTask
from nextstep.training.text_to_image import TextToImageTask
from nextstep.training.trainer import StepRecord, Trainer

__all__ = [
    "AspectRatioBuckets",
    "CheckpointManager",
    "DataConfig",
    "DistributedContext",
    "ExponentialMovingAverage",
    "RecipeConfig",
    "StepRecord",
    "StepResult",
    "TextToImageTask",
    "TrainConfig",
    "Trainer",
    "TrainingData",
    "TrainingTask",
    "WarmupCosineSchedule",
    "build_latent_cache",
    "build_optimizer",
    "build_training_data",
    "load_recipe",
    "run_recipe",
]
