"""The training loop's view of a model: a loss over a batch, plus a few optional hooks.

`Trainer` knows nothing about NextStep. A `TrainingTask` turns one batch into
a scalar loss; the loop does the rest (accumulation, clipping, the optimiser,
the schedule, EMA, checkpoints, logging, distribution). Training another model
(an image tokenizer, say) means writing another task.

A task whose loss is a mean over targets that vary in number between batches
(text tokens, say) can also count them (`TrainingTask.target_counts`): the loop
then divides by the targets of the whole optimiser step, so that accumulation
and several processes train on the loss of one big batch.
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
        metrics: extra scalars to log (real numbers or one-element tensors): averaged over
            micro-batches and processes, or summed when the loss is this micro-batch's share
            of the step's (a task that counts targets, `TrainingTask.target_counts`), its
            metrics then being shares too.
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

    Attributes:
        samples_from_prompts: whether `sample_images` draws from ``train.sample_prompts`` (a run that
            draws samples then needs at least one); False for tasks that preview something else.
    """

    samples_from_prompts: bool = False

    def __init__(self, model: nn.Module):
        self.model = model

    @abstractmethod
    def loss(self, module: nn.Module, batch: Any, generator: torch.Generator) -> StepResult:
        """The loss of one micro-batch.

        Args:
            module: what to call for the forward pass (``self.model`` itself or a
                DDP / FSDP wrapper of it, so that gradients are synchronised).
            batch: one micro-batch from the data loader, as `prepare` returned it.
            generator: the only source of randomness for this micro-batch (the one
                `prepare` drew from).

        A task that counts targets (`target_counts`) is also called with ``totals=``.
        """

    def prepare(self, batch: Any, generator: torch.Generator) -> Any:
        """One micro-batch made ready for `loss` (default: the batch itself).

        When the step counts targets (`target_counts`, ``loss_averaging="step"``) the trainer
        prepares every micro-batch of an optimiser step before the first forward pass; otherwise
        each just before its own. `loss` then goes on drawing from the same ``generator``.
        """
        return batch

    def target_counts(self, prepared: Any) -> dict[str, float]:
        """How many targets each term of the loss averages over, in one prepared micro-batch.

        A task that names its terms here (the default names none) is called as
        ``loss(module, prepared, generator, totals=totals)``, ``totals`` holding each count
        summed over the step's micro-batches and processes, and returns its micro-batch's share
        of the step's loss: each term summed over its targets and divided by its total. The
        shares of a step add up to the loss of all its examples taken as one batch, however
        they are split over accumulation steps and processes (``TrainConfig.loss_averaging``
        ``"step"``). A task that names none returns its micro-batch's own mean, and each
        micro-batch weighs the same (as with ``loss_averaging="micro_batch"``).
        """
        return {}

    @property
    def names_target_counts(self) -> bool:
        """Whether the task overrides `target_counts` (so a step under ``loss_averaging="step"``
        counts its targets before its first forward pass)."""
        return type(self).target_counts is not TrainingTask.target_counts

    @property
    def counts_targets(self) -> bool:
        """Whether ``TrainConfig.loss_averaging`` can change how the task trains: by default, whether
        it overrides `target_counts`. A task whose micro-batches always hold equal counts trains alike
        either way and may say False (a resume across the two settings is then not refused)."""
        return self.names_target_counts

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
