"""Exact ground truth of a shapes scene: which objects, what colour, where, how many.

Positions and sizes are fractions of the image side, so one scene describes its
rendering at any resolution; `ShapeObject.bbox` converts to pixels.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

#: Shape names the renderer draws.
SHAPES = ("circle", "square", "triangle")

#: Colour names and their RGB values (distinct in hue, so a classifier can tell them apart).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 38, 38),
    "green": (34, 160, 60),
    "blue": (37, 80, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 60, 190),
    "orange": (245, 125, 20),
}

#: Spatial relations between two objects, as written in captions.
RELATIONS = ("left of", "right of", "above", "below")

#: What a caption tests: the six GenEval categories (by GenEval's tag names), then two
#: training-only variants that also state colours ("three red squares",
#: "a red circle to the left of a blue square").
SCENE_KINDS = ("single_object", "two_object", "counting", "colors", "position", "color_attr",
               "colour_counting", "colour_position")


@dataclass(frozen=True)
class ShapeObject:
    """One filled shape.

    Attributes:
        shape: one of `SHAPES`.
        colour: one of `COLOURS`.
        center: (x, y) of the centre as fractions of width and height; (0, 0) is top left.
        size: side (or diameter) as a fraction of the shorter image side.
    """

    shape: str
    colour: str
    center: tuple[float, float]
    size: float

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {list(SHAPES)}, found {self.shape!r}")
        if self.colour not in COLOURS:
            raise ValueError(f"colour must be one of {sorted(COLOURS)}, found {self.colour!r}")
        if not 0 < self.size <= 1:
            raise ValueError(f"size must be in (0, 1], found {self.size!r}")

    def bbox(self, width: int, height: int) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) in pixels of an image of ``width`` x ``height``."""
        side = self.size * min(width, height)
        cx, cy = self.center[0] * width, self.center[1] * height
        return (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)

    def drawn_box(self, width: int = 1, height: int = 1) -> tuple[float, float, float, float]:
        """The tight box of the drawn shape: `bbox`, less the empty rows above and below a triangle."""
        left, top, right, bottom = self.bbox(width, height)
        if self.shape == "triangle":
            cy, half = (top + bottom) / 2, (right - left) * math.sqrt(3) / 4
            return (left, cy - half, right, cy + half)
        return (left, top, right, bottom)

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.shape, "colour": self.colour, "center": list(self.center), "size": self.size}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ShapeObject":
        return cls(data["shape"], data["colour"], tuple(data["center"]), float(data["size"]))


@dataclass(frozen=True)
class Relation:
    """A spatial relation stated by a caption: ``objects[subject]`` is ``relation`` ``objects[reference]``."""

    subject: int
    relation: str
    reference: int

    def __post_init__(self) -> None:
        if self.relation not in RELATIONS:
            raise ValueError(f"relation must be one of {list(RELATIONS)}, found {self.relation!r}")


@dataclass(frozen=True)
class Scene:
    """A whole image's content and its caption.

    Attributes:
        objects: the shapes, drawn in order.
        caption: the text that describes them.
        kind: which skill the caption tests, one of `SCENE_KINDS`.
        relation: the spatial relation a ``position`` or ``colour_position`` caption states.
        background: RGB background.
    """

    objects: tuple[ShapeObject, ...]
    caption: str
    kind: str
    relation: Relation | None = None
    background: tuple[int, int, int] = (255, 255, 255)

    def __post_init__(self) -> None:
        if self.kind not in SCENE_KINDS:
            raise ValueError(f"kind must be one of {list(SCENE_KINDS)}, found {self.kind!r}")
        if self.relation is not None:
            for index in (self.relation.subject, self.relation.reference):
                if not 0 <= index < len(self.objects):
                    raise ValueError(
                        f"relation refers to object {index} but the scene has {len(self.objects)}"
                    )

    def counts(self) -> Counter:
        """How many objects of each ``(colour, shape)`` pair the scene holds."""
        return Counter((o.colour, o.shape) for o in self.objects)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "caption": self.caption,
            "kind": self.kind,
            "objects": [o.to_dict() for o in self.objects],
            "background": list(self.background),
        }
        if self.relation is not None:
            out["relation"] = {"subject": self.relation.subject, "relation": self.relation.relation,
                               "reference": self.relation.reference}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Scene":
        relation = data.get("relation")
        return cls(
            objects=tuple(ShapeObject.from_dict(o) for o in data["objects"]),
            caption=data["caption"],
            kind=data["kind"],
            relation=Relation(**relation) if relation else None,
            background=tuple(data.get("background", (255, 255, 255))),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> "Scene":
        return cls.from_dict(json.loads(text))
