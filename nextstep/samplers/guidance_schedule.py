"""Guidance scales that change over an image's tokens, named by their direction.

``progress`` is the share of the image's tokens sampled before the token,
``index / count``: 0 for the first token, ``(L - 1) / L`` for the last of L.

| schedule | scale at progress p | first token | last token |
|---|---|---|---|
| ``constant`` | ``s`` | s | s |
| ``linear_increasing`` | ``1 + (s - 1) * p`` | 1 | ``1 + (s - 1) (L - 1) / L`` |
| ``linear_decreasing`` | ``1 + (s - 1) * (1 - p)`` | s | ``1 + (s - 1) / L`` |

The NextStep-1 release calls its decreasing schedule ``"linear"``, the opposite
direction to MAR's ``"linear"`` (which increases); here ``"linear"`` is an alias of
``linear_decreasing``, which is the release's schedule exactly:
``1 + (s - 1) * (L - i) / L`` at the token with ``i`` tokens before it.
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
        progress: ``index / count`` of the token (`token_progress`).

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
    """The share of an image's ``count`` tokens sampled before the token at ``index``: ``index / count``."""
    return index / count
