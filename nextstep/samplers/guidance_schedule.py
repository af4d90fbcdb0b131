"""Guidance scales that change over an image's tokens, named by their direction.

``progress`` is the position of the token being sampled, ``index / (count - 1)``:
0 for the first token of an image, 1 for the last.

| schedule | scale at progress p | first token | last token |
|---|---|---|---|
| ``constant`` | ``s`` | s | s |
| ``linear_increasing`` | ``1 + (s - 1) * p`` | 1 | s |
| ``linear_decreasing`` | ``1 + (s - 1) * (1 - p)`` | s | 1 |

The NextStep-1 release calls its decreasing schedule ``"linear"``, the opposite
direction to MAR's ``"linear"`` (which increases); here ``"linear"`` is an alias of
``linear_decreasing``, what the release's schedule actually does.
"""

from __future__ import annotations

GUIDANCE_SCHEDULES = ("constant", "linear_increasing", "linear_decreasing")
GUIDANCE_SCHEDULE_ALIASES = {"linear": "linear_decreasing"}


def resolve_guidance_schedule(name: str) -> str:
    """The canonical schedule name for ``name``; ``ValueError`` lists the known names."""
    name = GUIDANCE_SCHEDULE_ALIASES.get(name, name) if isinstance(name, str) else name
    if name not in GUIDANCE_SCHEDULES:
        known = list(GUIDANCE_SCHEDULES) + [f"{alias} (= {target})"
                                            for alias, target in GUIDANCE_SCHEDULE_ALIASES.items()]
        raise ValueError(f"unknown guidance schedule {name!r}; known: {known}")
    return name


def scheduled_scale(scale: float, schedule: str, progress: float) -> float:
    """The guidance scale of a token at ``progress`` in [0, 1] under ``schedule``.

    Args:
        scale: the nominal scale s.
        schedule: a name from `GUIDANCE_SCHEDULES` (or an alias).
        progress: ``index / (count - 1)`` of the token.

    Returns:
        the scale for that token (a Python float).
    """
    if schedule not in GUIDANCE_SCHEDULES:
        schedule = resolve_guidance_schedule(schedule)
    if schedule == "constant":
        return scale
    if schedule == "linear_increasing":
        return 1.0 + (scale - 1.0) * progress
    return 1.0 + (scale - 1.0) * (1.0 - progress)


def token_progress(index: int, count: int) -> float:
    """``index / (count - 1)``, and 0 for a single token."""
    return index / (count - 1) if count > 1 else 0.0
