"""Guidance as objects: the interface, text classifier-free guidance, and the guided velocity.

Legend: G guidance branches, N tokens, D token dim, C condition dim, E evaluation times.

Branches are stacked along a leading axis: ``[cond; uncond]`` for two-way CFG,
``[cond; uncond_1; uncond_2]`` for editing (see
`nextstep.samplers.editing_guidance.ImageEditingGuidance`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import torch
from einops import rearrange

from nextstep.samplers.guidance_schedule import resolve_guidance_schedule, scheduled_scale

if TYPE_CHECKING:
    from nextstep.heads.base import ImageHead


class Guidance(ABC):
    """Combines per-branch velocity predictions into one.

    Attributes:
        num_branches: how many condition branches the model must evaluate.
    """

    num_branches: int = 1

    @abstractmethod
    def combine(
        self, predictions: torch.Tensor, t: torch.Tensor | None = None, progress: float = 0.0
    ) -> torch.Tensor:
        """Guided velocity of one solver evaluation.

        Args:
            predictions: (G, N, D) velocity per branch; branch 0 is the conditional one.
            t: (N,) flow time of each token at this evaluation, or None when unknown.
            progress: the share of the token's image sampled before it, ``index / count``
                (0 for the first token); see `nextstep.samplers.guidance_schedule`.

        Returns:
            (N, D) guided velocity.
        """


class NoGuidance(Guidance):
    """The conditional prediction, unchanged."""

    num_branches = 1

    def combine(self, predictions, t=None, progress=0.0) -> torch.Tensor:
        check_predictions(self, predictions)
        return predictions[0]


FULL_INTERVAL = (0.0, 1.0)


def check_predictions(guidance: Guidance, predictions: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``predictions`` is (G, N, D) with G the guidance's ``num_branches``."""
    if predictions.ndim != 3 or predictions.shape[0] != guidance.num_branches:
        raise ValueError(f"{type(guidance).__name__} combines predictions of shape ({guidance.num_branches}, N, D), "
                         f"one per branch, found {tuple(predictions.shape)}")


def check_scale(name: str, value: float, low: float = 0.0) -> float:
    """``float(value)`` after checking that it is a finite number >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value < math.inf:
        raise ValueError(f"{name} must be a finite number >= {low:g}, found {value!r}")
    return float(value)


def check_interval(interval: tuple[float, float]) -> tuple[float, float]:
    """``(low, high)`` with ``0 <= low <= high <= 1``, as floats; raise otherwise."""
    try:
        low, high = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(f"guidance interval must be a pair (low, high), found {interval!r}") from None
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"guidance interval must satisfy 0 <= low <= high <= 1, found {interval!r}")
    return low, high


def check_renorm(renorm: float | None) -> float | None:
    """None, or a positive float; raise otherwise."""
    if renorm is None:
        return None
    if isinstance(renorm, bool) or not isinstance(renorm, (int, float)) or not renorm > 0:
        raise ValueError(f"renorm must be None or a number > 0, found {renorm!r}")
    return float(renorm)


def limit_guidance(
    guided: torch.Tensor,
    conditional: torch.Tensor,
    t: torch.Tensor | None,
    interval: tuple[float, float],
    renorm: float | None,
) -> torch.Tensor:
    """Apply the optional norm cap and time interval to a guided velocity.

    Args:
        guided: (N, D) guided velocity.
        conditional: (N, D) conditional velocity.
        t: (N,) times, or None (the interval is then not applied).
        interval: guidance acts only for ``low <= t <= high``; elsewhere the
            conditional velocity is used.
        renorm: if set, each token's guided velocity is scaled down so its norm
            is at most ``renorm`` times the conditional velocity's norm.

    Returns:
        (N, D) velocity.
    """
    if renorm is not None:
        limit = conditional.norm(dim=-1, keepdim=True) * renorm
        norm = guided.norm(dim=-1, keepdim=True)
        guided = guided * torch.where(norm > limit, limit / norm.clamp_min(1e-12), 1.0)
    if t is not None and interval != FULL_INTERVAL:
        low, high = interval
        inside = (t >= low) & (t <= high)
        guided = torch.where(inside[:, None], guided, conditional)
    return guided


class ClassifierFreeGuidance(Guidance):
    """Two-way CFG: ``v_u + s * (v_c - v_u)``; branch 0 conditional, 1 unconditional.

    Args:
        scale: guidance scale s (>= 0). 1 returns the conditional prediction.
        schedule: how s changes over an image's tokens: ``constant``,
            ``linear_increasing``, ``linear_decreasing`` (alias ``linear``, the release's).
        interval: guide only for flow times ``low <= t <= high`` (conditional elsewhere).
        renorm: cap each guided token velocity's norm at ``renorm`` times the
            conditional one's (None: no cap).
    """

    num_branches = 2

    def __init__(
        self,
        scale: float,
        *,
        schedule: str = "constant",
        interval: tuple[float, float] = (0.0, 1.0),
        renorm: float | None = None,
    ):
        self.scale = check_scale("cfg scale", scale)
        self.schedule = resolve_guidance_schedule(schedule)
        self.interval = check_interval(interval)
        self.renorm = check_renorm(renorm)

    def combine(self, predictions, t=None, progress=0.0) -> torch.Tensor:
        check_predictions(self, predictions)
        conditional, unconditional = predictions[0], predictions[1]
        scale = scheduled_scale(self.scale, self.schedule, progress)
        guided = torch.lerp(unconditional, conditional, scale)
        if self.renorm is None and self.interval == FULL_INTERVAL:
            return guided
        return limit_guidance(guided, conditional, t, self.interval, self.renorm)

    def __repr__(self) -> str:
        return (f"ClassifierFreeGuidance({self.scale}, schedule={self.schedule!r}, "
                f"interval={self.interval}, renorm={self.renorm})")


def guidance_for_scale(
    scale: float,
    *,
    image_scale: float | None = None,
    schedule: str = "constant",
    interval: tuple[float, float] = (0.0, 1.0),
    renorm: float | None = None,
) -> Guidance:
    """The cheapest guidance object that computes the requested combination.

    Text-to-image (``image_scale`` None): `NoGuidance` at ``scale == 1`` (half the
    work), else `ClassifierFreeGuidance`. Editing: `NoGuidance` when both scales
    are 1; two-way CFG against ``image + negative prompt`` when ``image_scale == 1``
    (the three-way formula reduces to it); else
    `nextstep.samplers.editing_guidance.ImageEditingGuidance`.

    Args:
        scale: text guidance scale (>= 0).
        image_scale: image guidance scale for editing (>= 0), or None.
        schedule: see `ClassifierFreeGuidance`.
        interval: see `ClassifierFreeGuidance`.
        renorm: see `ClassifierFreeGuidance`.
    """
    scale = check_scale("cfg", scale)
    resolve_guidance_schedule(schedule)
    options = dict(schedule=schedule, interval=interval, renorm=renorm)
    if image_scale is not None and check_scale("cfg_img", image_scale) != 1.0:
        from nextstep.samplers.editing_guidance import ImageEditingGuidance

        return ImageEditingGuidance(scale, image_scale, **options)
    if scale == 1.0:
        check_interval(interval)
        check_renorm(renorm)
        return NoGuidance()
    return ClassifierFreeGuidance(scale, **options)


class GuidedVelocity:
    """The velocity field a sampler integrates: the head on every branch, then guidance.

    Args:
        head: the image head.
        conditions: (G, N, C) condition per branch.
        guidance: how to combine the branches.
        times: the sampler's evaluation times (see
            `nextstep.samplers.base.Sampler.evaluation_times`) or the head's
            `nextstep.heads.base.ImageHead.prepare_times` of them, passed to
            `nextstep.heads.base.ImageHead.prepare`; None if unknown.
        progress: position of this token in its image, for guidance schedules.

    Attributes:
        conditions: the (G, N, C) conditions it was built with (what a recording sampler keeps).
    """

    def __init__(
        self,
        head: "ImageHead",
        conditions: torch.Tensor,
        guidance: Guidance,
        *,
        times: Any = None,
        progress: float = 0.0,
    ):
        if conditions.ndim != 3 or conditions.shape[0] != guidance.num_branches \
                or conditions.shape[2] != head.condition_dim:
            raise ValueError(
                f"guidance needs conditions of shape ({guidance.num_branches}, N, {head.condition_dim}), "
                f"found {tuple(conditions.shape)}"
            )
        self.guidance = guidance
        self.conditions = conditions
        self.progress = float(progress)
        self.branches = conditions.shape[0]
        self.dtype = conditions.dtype
        self.velocity = head.prepare(rearrange(conditions, "g n c -> (g n) c"), times)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t (N, D), t (N,) -> guided velocity (N, D)."""
        if t.shape != x_t.shape[:1]:
            raise ValueError(f"t must have shape ({x_t.shape[0]},), one time per row of x_t, found {tuple(t.shape)}")
        x, times = x_t, t
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        if self.branches > 1:
            x = torch.cat([x] * self.branches)  # (G * N, D), branch-major like the conditions
            times = torch.cat([t] * self.branches)
        velocity = self.velocity(x, times)
        if velocity.dtype != x_t.dtype:
            velocity = velocity.to(x_t.dtype)
        # (G, N, D); a plain view rather than einops, since this runs at every solver step
        return self.guidance.combine(velocity.view(self.branches, *x_t.shape), t, self.progress)
