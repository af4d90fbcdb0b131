"""The image head interface: a per-token velocity model and its training loss.

Legend: N tokens (flattened over batch and positions), D token dim,
C condition dim (the backbone hidden size after ``image_out_projector``).

Time convention everywhere: t=0 is noise, t=1 is data,
``x_t = t * x1 + (1 - t) * x0`` and the velocity is ``x1 - x0``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn


class ImageHead(nn.Module, ABC):
    """Predicts the velocity of one image token given the transformer's condition.

    Implement `velocity` and `loss` and the two size properties.
    """

    @property
    @abstractmethod
    def token_dim(self) -> int:
        """D, the width of an image token."""

    @property
    @abstractmethod
    def condition_dim(self) -> int:
        """C, the width of the conditioning vector."""

    @abstractmethod
    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Velocity at noisy tokens.

        Args:
            x_t: (N, D) noisy tokens.
            t: (N,) times in [0, 1].
            condition: (N, C).

        Returns:
            (N, D) predicted ``x1 - x0``.
        """

    @abstractmethod
    def loss(
        self, target: torch.Tensor, condition: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Per-token training loss.

        Args:
            target: (N, D) clean tokens x1.
            condition: (N, C).

        Returns:
            (N,) float32 loss per token (averaged over feature dims and repeats).
        """
