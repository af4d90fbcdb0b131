"""The image head interface: a per-token velocity model and its training loss.

Legend: N tokens (flattened over batch and positions), D token dim,
C condition dim (the backbone hidden size after ``image_out_projector``),
E evaluation times.

Time convention everywhere: t=0 is noise, t=1 is data,
``x_t = t * x1 + (1 - t) * x0`` and the velocity is ``x1 - x0``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable

import torch
from torch import nn


class ImageHead(nn.Module, ABC):
    """Predicts the velocity of one image token given the transformer's condition.

    Implement `velocity` and `loss` and the two size properties. Override
    `prepare` (and `prepare_times`) to speed up sampling, where one condition
    is integrated over many solver steps.
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
            generator: source of every random draw (times, noise).

        Returns:
            (N,) float32 loss per token (averaged over feature dims and repeats).
        """

    def check_shapes(self, *, target: torch.Tensor | None = None, condition: torch.Tensor | None = None) -> None:
        """Raise ``ValueError`` naming the expected and the found shape, unless ``target`` is (N, D)
        and ``condition`` (N, C), with the same N when both are given. For the first lines of `loss`
        (``check_shapes(target=..., condition=...)``) and `prepare` (``check_shapes(condition=...)``)."""
        if target is not None and (target.ndim != 2 or target.shape[-1] != self.token_dim):
            raise ValueError(f"target must have shape (N, {self.token_dim}), found {tuple(target.shape)}")
        if condition is not None:
            rows = "N" if target is None else str(target.shape[0])
            if condition.ndim != 2 or condition.shape[-1] != self.condition_dim or (
                    target is not None and condition.shape[0] != target.shape[0]):
                raise ValueError(f"condition must have shape ({rows}, {self.condition_dim}), "
                                 f"found {tuple(condition.shape)}")

    def flow_error(self, target: torch.Tensor, condition: torch.Tensor, t: torch.Tensor,
                   noise: torch.Tensor) -> torch.Tensor:
        """Squared velocity error at given times and noise: target x1 (N, D), condition (N, C),
        t (N,), noise x0 (N, D) -> (N,) float32, ``|velocity(x_t, t) - (x1 - x0)|^2`` averaged over
        the features, with ``x_t = t * x1 + (1 - t) * x0``.

        The flow-matching loss of one draw of (t, x0); `loss` averages it over its own draws.
        Computed in float32, the head called on x_t in the condition's dtype and on the times in
        float32, as sampling calls it (a bfloat16 time would be rounded to 1/256 near 1).
        """
        self.check_shapes(target=target, condition=condition)
        if not isinstance(t, torch.Tensor) or not isinstance(noise, torch.Tensor) or t.shape != target.shape[:1] \
                or noise.shape != target.shape:
            raise ValueError(f"flow_error needs t of shape ({target.shape[0]},) and noise of shape "
                             f"{tuple(target.shape)} for a target of that shape, found "
                             f"{tuple(getattr(t, 'shape', ())) or type(t).__name__} and "
                             f"{tuple(getattr(noise, 'shape', ())) or type(noise).__name__}")
        x1, x0, t = target.float(), noise.float(), t.float()
        x_t = t[:, None] * x1 + (1 - t[:, None]) * x0
        prediction = self.velocity(x_t.to(condition.dtype), t, condition).float()
        return (prediction - (x1 - x0)).pow(2).mean(-1)

    def prepare_times(self, times: torch.Tensor) -> Any:
        """Work that depends only on the evaluation times, shared by every token of a generation.

        Whatever this returns is what `prepare` receives as ``times``. The
        default returns ``times`` unchanged. The result is valid while the
        head's parameters and modules stay unchanged.

        Args:
            times: (E,) increasing times (see
                `nextstep.samplers.base.Sampler.evaluation_times`).
        """
        return times

    def prepare(
        self, condition: torch.Tensor, times: Any = None
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The velocity function of one fixed condition, for a sampler to call many times.

        The default binds ``condition`` to `velocity`. A head may instead
        precompute everything that depends only on the condition and, when
        ``times`` is given, on those times.

        Args:
            condition: (N, C) condition of every row.
            times: None, or (E,) increasing times or their `prepare_times`; when
                given, the returned function is only ever called with ``t``
                values taken from them.

        Returns:
            ``fn(x_t (N, D), t (N,)) -> (N, D)`` equal to ``velocity(x_t, t, condition)``.
        """
        return _BoundVelocity(self, condition)


class _BoundVelocity:
    """``velocity(x_t, t, condition)`` with the condition fixed."""

    def __init__(self, head: ImageHead, condition: torch.Tensor):
        self.head = head
        self.condition = condition

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.head.velocity(x_t, t, self.condition)
