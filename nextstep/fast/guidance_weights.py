"""Guidance objects written as per-branch weights, for the fused guidance combine.

Legend: E evaluation times, G guidance branches, T tokens of an image.

The guidance objects of `nextstep.samplers.guidance` combine branch velocities
linearly, so each one is a weight per branch; the weights depend on the
token's position (scale schedules) and on the flow time (guidance intervals),
never on the velocities. The norm cap (``renorm``) is not linear and has no
weights: guidance with it runs through the generic path.
"""

from __future__ import annotations

import torch

from nextstep.samplers.editing_guidance import ImageEditingGuidance
from nextstep.samplers.guidance import FULL_INTERVAL, ClassifierFreeGuidance, Guidance, NoGuidance
from nextstep.samplers.guidance_schedule import scheduled_scale, token_progress

#: The guidance classes with weights (exact types: a subclass may change ``combine``).
WEIGHTED_GUIDANCE = (NoGuidance, ClassifierFreeGuidance, ImageEditingGuidance)


def weights_reason(guidance: Guidance) -> str | None:
    """None when `branch_weights` can write ``guidance`` as weights, else why not."""
    if type(guidance) not in WEIGHTED_GUIDANCE:
        names = ", ".join(cls.__name__ for cls in WEIGHTED_GUIDANCE)
        return f"{type(guidance).__name__} has no branch weights (weighted guidance: {names})"
    if getattr(guidance, "renorm", None) is not None:
        return "guidance with renorm (a norm cap) is not a weighted sum of the branches"
    return None


def branch_weights(guidance: Guidance, times: torch.Tensor, progress: float = 0.0) -> torch.Tensor:
    """Per-branch weights of ``guidance`` at each evaluation time, for one token.

    ``guidance.combine(predictions, t, progress)`` equals
    ``sum_g weights[e, g] * predictions[g]`` at ``t = times[e]``.

    Args:
        guidance: a `WEIGHTED_GUIDANCE` object without ``renorm``.
        times: (E,) evaluation times.
        progress: the token's position in its image (see
            `nextstep.samplers.guidance_schedule.token_progress`).

    Returns:
        (E, G) float32 on the CPU.
    """
    reason = weights_reason(guidance)
    if reason is not None:
        raise ValueError(reason)
    count = times.shape[0]
    if isinstance(guidance, NoGuidance):
        return torch.ones(count, 1)
    scale = scheduled_scale(guidance.scale, guidance.schedule, progress)
    if isinstance(guidance, ClassifierFreeGuidance):
        guided = [scale, 1.0 - scale]
    else:
        image_scale = scheduled_scale(guidance.image_scale, guidance.schedule, progress)
        guided = [scale, image_scale - scale, 1.0 - image_scale]
    weights = torch.tensor(guided, dtype=torch.float64).expand(count, -1).clone()
    if guidance.interval != FULL_INTERVAL:
        low, high = guidance.interval
        t = times.detach().cpu()
        outside = ~((t >= low) & (t <= high))
        conditional_only = torch.zeros(len(guided), dtype=torch.float64)
        conditional_only[0] = 1.0
        weights[outside] = conditional_only
    return weights.float()


def image_branch_weights(guidance: Guidance, times: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """`branch_weights` of every token of an image, stacked.

    Args:
        guidance: as in `branch_weights`.
        times: (E,) evaluation times.
        num_tokens: T, tokens in the image.

    Returns:
        (T, E, G) float32 on the CPU; the same table repeated for a constant schedule.
    """
    if getattr(guidance, "schedule", "constant") == "constant":
        return branch_weights(guidance, times).expand(num_tokens, -1, -1)
    return torch.stack([branch_weights(guidance, times, token_progress(index, num_tokens))
                        for index in range(num_tokens)])
