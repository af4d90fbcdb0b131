"""AdamW with decoupled weight decay on matrices only, and the warm-up + cosine schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from nextstep.training.config import TrainConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into a decayed group (ndim >= 2) and an undecayed one.

    Frozen parameters (``requires_grad=False``, e.g. the image tokenizer) are left out.
    Parameters shared between modules appear once.
    """
    decayed, undecayed, seen = [], [], set()
    for parameter in model.parameters():
        if not parameter.requires_grad or id(parameter) in seen:
            continue
        seen.add(id(parameter))
        (decayed if parameter.ndim >= 2 else undecayed).append(parameter)
    if not decayed and not undecayed:
        raise ValueError("the model has no trainable parameters (every requires_grad is False)")
    return [
        {"params": decayed, "weight_decay": weight_decay},
        {"params": undecayed, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of ``model`` with the config's betas, eps and decay."""
    return torch.optim.AdamW(
        parameter_groups(model, config.weight_decay),
        lr=config.learning_rate,
        betas=tuple(config.betas),
        eps=config.eps,
        # The for-each kernels add up in a different order than the single-tensor
        # ones on some devices; one fixed choice keeps runs comparable.
        foreach=False,
    )


@dataclass(frozen=True)
class WarmupCosineSchedule:
    """Learning rate as a pure function of the step: linear warm-up, then cosine decay.

    ``rate(step)`` rises linearly from ``peak / warmup_steps`` at step 0 to ``peak``
    at step ``warmup_steps - 1`` (step 0 without warm-up), then follows half a cosine
    down to ``minimum`` at step ``total_steps``, where a run of ``total_steps`` ends:
    each rate is taken once, and no step of a run runs at a zero rate (the first
    is ``peak / warmup_steps``, the last just above ``minimum``). It holds no state,
    so resuming needs only the step.

    Args:
        peak: learning rate after warm-up.
        warmup_steps: steps of the linear warm-up (0 starts at the peak).
        total_steps: steps of the whole run.
        minimum: learning rate at the end.
    """

    peak: float
    warmup_steps: int
    total_steps: int
    minimum: float = 0.0

    @classmethod
    def from_config(cls, config: TrainConfig) -> "WarmupCosineSchedule":
        return cls(config.learning_rate, config.warmup_steps, config.max_steps, config.min_learning_rate)

    def rate(self, step: int) -> float:
        """Learning rate of optimiser step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.peak * (step + 1) / self.warmup_steps
        top = max(self.warmup_steps - 1, 0)
        decay_steps = max(self.total_steps - top, 1)
        progress = min((step - top) / decay_steps, 1.0)
        return self.minimum + 0.5 * (self.peak - self.minimum) * (1 + math.cos(math.pi * progress))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every parameter group's learning rate for ``step``; returns it."""
        rate = self.rate(step)
        for group in optimizer.param_groups:
            group["lr"] = rate
        return rate
