"""Spatial relations between two objects: the axis rule that writes captions, GenEval's box rule that scores them.

Two rules, both on (left, top, right, bottom) boxes or (x, y) centres in any one
unit (pixels or fractions of the image side; y grows downwards):

* `centres_satisfy`: the subject's centre is offset along the relation's axis by
  more than a margin, and further along that axis than along the other. The world
  captions a scene's relation only when this holds with a margin, so every
  caption names the one obvious relation.
* `box_relations`: GenEval's rule for its ``position`` category. The centre offset
  along each axis is first reduced by ``threshold`` times the two boxes' summed
  extents on that axis (to no less than zero, keeping its sign), then divided by
  the full centre distance; a relation holds when its axis's reduced share is
  beyond one half in its direction. A diagonal neighbour can hold two relations,
  and boxes close on both axes hold none.
"""

from __future__ import annotations

import math

from nextstep.training.data.shapes.metadata import RELATIONS

#: GenEval's default ``position_threshold``: the share of the boxes' extents an offset must exceed.
POSITION_THRESHOLD = 0.1

Box = tuple[float, float, float, float]


def centres_satisfy(relation: str, subject: tuple[float, float], reference: tuple[float, float],
                    margin: float = 0.0) -> bool:
    """Whether a ``subject`` centre is ``relation`` a ``reference`` centre.

    The offset along the relation's axis must exceed ``margin`` and be larger
    than the offset along the other axis.
    """
    dx = subject[0] - reference[0]
    dy = subject[1] - reference[1]
    if relation == "left of":
        return dx < -margin and abs(dx) > abs(dy)
    if relation == "right of":
        return dx > margin and abs(dx) > abs(dy)
    if relation == "above":
        return dy < -margin and abs(dy) > abs(dx)
    if relation == "below":
        return dy > margin and abs(dy) > abs(dx)
    raise ValueError(f"relation must be one of {list(RELATIONS)}, found {relation!r}")


def box_relations(subject: Box, reference: Box, threshold: float = POSITION_THRESHOLD) -> frozenset[str]:
    """The relations of `RELATIONS` that the ``subject`` box stands in to the ``reference`` box (GenEval's rule).

    Args:
        subject: (left, top, right, bottom) of the object the relation is about.
        reference: the box it is compared with, in the same unit.
        threshold: share of the summed box extents subtracted from each centre offset.
    """
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, found {threshold!r}")
    offsets = []
    for low, high in ((0, 2), (1, 3)):  # x, then y
        offset = (subject[low] + subject[high]) / 2 - (reference[low] + reference[high]) / 2
        extents = (subject[high] - subject[low]) + (reference[high] - reference[low])
        offsets.append((offset, math.copysign(max(abs(offset) - threshold * extents, 0.0), offset)))
    (dx, reduced_x), (dy, reduced_y) = offsets
    distance = math.hypot(dx, dy)
    if reduced_x == 0 and reduced_y == 0:
        return frozenset()
    share_x, share_y = reduced_x / distance, reduced_y / distance
    held = {"left of": share_x < -0.5, "right of": share_x > 0.5, "above": share_y < -0.5, "below": share_y > 0.5}
    return frozenset(relation for relation, holds in held.items() if holds)
