"""The training loop's view of a model: a loss over a batch, plus a few optional hooks.

`Trainer` knows nothing about NextStep. A `TrainingTask` turns one batch into
a scalar loss; the loop does the rest (accumulation, clipping, the optimiser,
the schedule, EMA, checkpoints, logging, distribution). Training another model
(an image tokenizer, say) means writing another task.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn


@dataclass
class StepResult:
    """What a task reports for one micro-batch.

    Attributes:
        loss: scalar to differentiate.
        metrics: extra scalars to log (averaged over micro-batches and processes).
        num_tokens: sequence positions processed (for throughput).
    """

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    num_tokens: int = 0


class TrainingTask(ABC):
    """A model plus the recipe that turns a batch into its loss.

    Args:
        model: the unwrapped model; its trainable parameters are those with
            ``requires_grad=True``.
    """

    def __init__(self, model: nn.Module):
        self.model = model

    @abstractmethod
    def loss(self, module: nn.Module, batch: Any, generator: torch.Generator) -> StepResult:
        """The loss of one micro-batch.

        Args:
            module: what to call for the forward pass (``self.model`` itself or a
                DDP / FSDP wrapper of it, so that gradients are synchronised).
            batch: one micro-batch from the data loader.
            generator: the only source of randomness for this micro-batch.
        """

    def shard_units(self) -> list[nn.Module]:
        """Submodules that FSDP shards as their own units (default: none besides the root)."""
        return []

    def unsharded_parameters(self) -> set[nn.Parameter]:
        """Parameters FSDP must leave whole on every process (default: the frozen ones)."""
        return {p for p in self.model.parameters() if not p.requires_grad}

    def enable_gradient_checkpointing(self) -> None:
        """Switch on activation recomputation; tasks whose model cannot do it raise ``ValueError``."""
        raise ValueError(f"{type(self).__name__} does not support gradient checkpointing")

    def sample_images(self, **settings: Any) -> list[Image.Image]:
        """Images for the periodic sample grid (default: none)."""
        return []

    def check_sample_settings(self, height: int, width: int) -> None:
        """Raise ``ValueError`` before training when `sample_images` could not draw at this size
        (default: any size)."""

    def write_checkpoint_files(self, directory: Path) -> None:
        """Add files to a checkpoint directory being written (default: nothing)."""

    def check_checkpoint_files(self) -> None:
        """Raise ``ValueError`` before training when `write_checkpoint_files` could not write them
        (default: nothing to check)."""
