"""Classifier-free guidance as objects, and the guided velocity of a head.

Branches are stacked along the batch: ``[cond; uncond]`` for two-way CFG.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from nextstep.heads.base import ImageHead


class Guidance(ABC):
    """Combines per-branch velocity predictions into one.

    Attributes:
        num_branches: how many condition branches the model must evaluate.
    """

    num_branches: int = 1

    @abstractmethod
    def combine(self, predictions: torch.Tensor) -> torch.Tensor:
        """predictions (branches, N, D) -> guided velocity (N, D)."""


class NoGuidance(Guidance):
    """The conditional prediction, unchanged."""

    num_branches = 1

    def combine(self, predictions: torch.Tensor) -> torch.Tensor:
        return predictions[0]


class ClassifierFreeGuidance(Guidance):
    """Two-way CFG: ``v_u + scale * (v_c - v_u)``; branch 0 conditional, 1 unconditional.

    Args:
        scale: guidance scale (>= 0). 1 returns the conditional prediction.
    """

    num_branches = 2

    def __init__(self, scale: float):
        if not scale >= 0:
            raise ValueError(f"cfg scale must be >= 0, found {scale}")
        self.scale = float(scale)

    def combine(self, predictions: torch.Tensor) -> torch.Tensor:
        conditional, unconditional = predictions[0], predictions[1]
        return unconditional + self.scale * (conditional - unconditional)


def guidance_for_scale(scale: float) -> Guidance:
    """CFG at ``scale``, or `NoGuidance` when the scale is exactly 1 (half the work)."""
    if not scale >= 0:
        raise ValueError(f"cfg scale must be >= 0, found {scale}")
    return NoGuidance() if scale == 1.0 else ClassifierFreeGuidance(scale)


class GuidedVelocity:
    """The velocity field a sampler integrates: the head on every branch, then guidance.

    Args:
        head: the image head.
        conditions: (branches, N, C) condition per branch.
        guidance: how to combine the branches.
    """

    def __init__(self, head: ImageHead, conditions: torch.Tensor, guidance: Guidance):
        if conditions.shape[0] != guidance.num_branches:
            raise ValueError(
                f"guidance needs {guidance.num_branches} condition branches, "
                f"found {conditions.shape[0]}"
            )
        self.head = head
        self.guidance = guidance
        self.branches = conditions.shape[0]
        self.conditions = conditions.flatten(0, 1)  # (branches * N, C)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t (N, D), t (N,) -> guided velocity (N, D)."""
        x = x_t.repeat(self.branches, 1).to(self.conditions.dtype)
        times = t.repeat(self.branches).to(self.conditions.dtype)
        velocity = self.head.velocity(x, times, self.conditions)
        velocity = velocity.view(self.branches, *x_t.shape).to(x_t.dtype)
        return self.guidance.combine(velocity)
