"""Three-way guidance for image editing (text and image scales)."""

from __future__ import annotations

import torch

from nextstep.samplers.guidance import (
    FULL_INTERVAL,
    Guidance,
    check_interval,
    check_predictions,
    check_renorm,
    check_scale,
    limit_guidance,
)
from nextstep.samplers.guidance_schedule import resolve_guidance_schedule, scheduled_scale


class ImageEditingGuidance(Guidance):
    """``v = v_u2 + s_img * (v_u1 - v_u2) + s * (v_c - v_u1)``.

    Branches: 0 ``c`` = input image + instruction, 1 ``u1`` = input image +
    negative prompt, 2 ``u2`` = negative prompt only. ``s_img`` pulls toward
    the input image, ``s`` toward the instruction. At ``s_img = 1`` this is
    two-way CFG with ``u1`` as the unconditional branch.

    Args:
        scale: text scale s (>= 0).
        image_scale: image scale s_img (>= 0).
        schedule: applied to both scales (see
            `nextstep.samplers.guidance_schedule`).
        interval: guide only for flow times ``low <= t <= high``.
        renorm: cap each guided token velocity's norm at ``renorm`` times the
            conditional one's.
    """

    num_branches = 3

    def __init__(
        self,
        scale: float,
        image_scale: float,
        *,
        schedule: str = "constant",
        interval: tuple[float, float] = (0.0, 1.0),
        renorm: float | None = None,
    ):
        self.scale = check_scale("cfg", scale)
        self.image_scale = check_scale("cfg_img", image_scale)
        self.schedule = resolve_guidance_schedule(schedule)
        self.interval = check_interval(interval)
        self.renorm = check_renorm(renorm)

    def combine(self, predictions, t=None, progress=0.0) -> torch.Tensor:
        check_predictions(self, predictions)
        conditional, with_image, without_image = predictions[0], predictions[1], predictions[2]
        scale = scheduled_scale(self.scale, self.schedule, progress)
        image_scale = scheduled_scale(self.image_scale, self.schedule, progress)
        guided = torch.lerp(without_image, with_image, image_scale)
        guided = guided.add_(conditional - with_image, alpha=scale)
        if self.renorm is None and self.interval == FULL_INTERVAL:
            return guided
        return limit_guidance(guided, conditional, t, self.interval, self.renorm)

    def __repr__(self) -> str:
        return (f"ImageEditingGuidance({self.scale}, {self.image_scale}, schedule={self.schedule!r}, "
                f"interval={self.interval}, renorm={self.renorm})")
