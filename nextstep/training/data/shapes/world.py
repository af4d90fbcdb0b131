"""The shapes world: random scenes of coloured shapes with captions that state their content.

Scene ``i`` is a pure function of ``(seed, split, i)``, so the dataset needs no
files and its ground truth (`Scene`) is exact. Captions test the skills of
compositional benchmarks such as GenEval: a single object, counting (two to
four of a kind), colour binding (two objects with their own colours) and
position (one object left of / right of / above / below another).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from nextstep.config import Config, require
from nextstep.training.data.base import ImageTextDataset, ImageTextSample
from nextstep.training.data.registry import register_dataset
from nextstep.training.data.shapes.metadata import (
    COLOURS,
    RELATIONS,
    SCENE_KINDS,
    SHAPES,
    Relation,
    Scene,
    ShapeObject,
)
from nextstep.training.data.shapes.render import render_scene

RELATION_WORDS = {"left of": "to the left of", "right of": "to the right of", "above": "above",
                  "below": "below"}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}


def _plural(shape: str) -> str:
    return shape + "s"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def object_phrase(obj: ShapeObject) -> str:
    """``"a red circle"`` for a red circle."""
    return f"{_article(obj.colour)} {obj.colour} {obj.shape}"


def boxes_overlap(box, boxes, margin: float) -> bool:
    """Whether ``box`` (left, top, right, bottom) comes within ``margin`` of any of ``boxes``."""
    left, top, right, bottom = box
    return any(
        left < other_right + margin and other_left - margin < right
        and top < other_bottom + margin and other_top - margin < bottom
        for other_left, other_top, other_right, other_bottom in boxes
    )


def _place(rng: random.Random, count: int, size_range: tuple[float, float],
           attempts: int = 200) -> list[tuple[tuple[float, float], float]] | None:
    """``count`` non-overlapping (centre, size) pairs inside the unit square, or None."""
    placed: list[tuple[tuple[float, float], float]] = []
    boxes: list[tuple[float, float, float, float]] = []
    for _ in range(attempts):
        if len(placed) == count:
            break
        size = rng.uniform(*size_range)
        half = size / 2
        cx, cy = rng.uniform(half + 0.02, 1 - half - 0.02), rng.uniform(half + 0.02, 1 - half - 0.02)
        box = (cx - half, cy - half, cx + half, cy + half)
        if not boxes_overlap(box, boxes, margin=0.03):
            placed.append(((cx, cy), size))
            boxes.append(box)
    return placed if len(placed) == count else None


def _holds(relation: str, subject: ShapeObject, reference: ShapeObject, margin: float = 0.1) -> bool:
    dx = subject.center[0] - reference.center[0]
    dy = subject.center[1] - reference.center[1]
    if relation == "left of":
        return dx < -margin and abs(dx) > abs(dy)
    if relation == "right of":
        return dx > margin and abs(dx) > abs(dy)
    if relation == "above":
        return dy < -margin and abs(dy) > abs(dx)
    if relation == "below":
        return dy > margin and abs(dy) > abs(dx)
    raise ValueError(f"unknown relation {relation!r}")


def relation_holds(scene: Scene) -> bool:
    """Whether a ``position`` scene's objects satisfy its stated relation (centre offsets)."""
    if scene.relation is None:
        return True
    rel = scene.relation
    return _holds(rel.relation, scene.objects[rel.subject], scene.objects[rel.reference], margin=0.0)


def sample_scene(rng: random.Random, kind: str, max_count: int = 4,
                 shapes: tuple[str, ...] = SHAPES, colours: tuple[str, ...] = tuple(COLOURS)) -> Scene:
    """Draw one scene of ``kind`` with ``rng``.

    Args:
        rng: the random source (a seeded `random.Random` gives a reproducible scene).
        kind: one of ``single``, ``counting``, ``colour_binding``, ``position``.
        max_count: largest count of a ``counting`` scene.
        shapes: shape names to draw from.
        colours: colour names to draw from.
    """
    while True:
        if kind == "single":
            spots = _place(rng, 1, (0.3, 0.6))
            if spots is None:
                continue
            obj = ShapeObject(rng.choice(shapes), rng.choice(colours), *spots[0])
            return Scene((obj,), object_phrase(obj), kind)
        if kind == "counting":
            count = rng.randint(2, max_count)
            spots = _place(rng, count, (0.16, 0.26))
            if spots is None:
                continue
            shape, colour = rng.choice(shapes), rng.choice(colours)
            objects = tuple(ShapeObject(shape, colour, c, s) for c, s in spots)
            return Scene(objects, f"{NUMBER_WORDS[count]} {colour} {_plural(shape)}", kind)
        if kind == "colour_binding":
            spots = _place(rng, 2, (0.22, 0.36))
            if spots is None:
                continue
            first_colour, second_colour = rng.sample(list(colours), 2)
            first_shape, second_shape = rng.choice(shapes), rng.choice(shapes)
            objects = (ShapeObject(first_shape, first_colour, *spots[0]),
                       ShapeObject(second_shape, second_colour, *spots[1]))
            return Scene(objects, f"{object_phrase(objects[0])} and {object_phrase(objects[1])}", kind)
        if kind == "position":
            relation = rng.choice(RELATIONS)
            spots = _place(rng, 2, (0.2, 0.32))
            if spots is None:
                continue
            first_colour, second_colour = rng.sample(list(colours), 2)
            objects = (ShapeObject(rng.choice(shapes), first_colour, *spots[0]),
                       ShapeObject(rng.choice(shapes), second_colour, *spots[1]))
            if not _holds(relation, objects[0], objects[1]):
                continue
            caption = f"{object_phrase(objects[0])} {RELATION_WORDS[relation]} {object_phrase(objects[1])}"
            return Scene(objects, caption, kind, Relation(0, relation, 1))
        raise ValueError(f"scene kind must be one of {list(SCENE_KINDS)}, found {kind!r}")


@dataclass
class ShapesConfig(Config):
    """The shapes world as a dataset.

    Args:
        num_samples: length of the dataset (scenes are drawn on demand).
        size: image side in pixels.
        seed: base seed of the scenes.
        split: ``train`` or ``test``; the splits draw from different seeds.
        kinds: scene kinds to mix (equally likely).
        max_count: largest count of a ``counting`` scene (2..6).
    """

    num_samples: int = 10000
    size: int = 64
    seed: int = 0
    split: str = "train"
    kinds: tuple[str, ...] = SCENE_KINDS
    max_count: int = 4

    def validate(self) -> None:
        require(self.num_samples >= 1, "num_samples", self.num_samples, ">= 1")
        require(self.size >= 8, "size", self.size, ">= 8")
        require(self.split in ("train", "test"), "split", self.split, "'train' or 'test'")
        require(len(self.kinds) > 0 and all(k in SCENE_KINDS for k in self.kinds), "kinds", self.kinds,
                f"a non-empty subset of {list(SCENE_KINDS)}")
        require(2 <= self.max_count <= 6, "max_count", self.max_count, "in [2, 6]")


@register_dataset("shapes")
class ShapesDataset(ImageTextDataset):
    """Rendered shapes scenes with captions; ``metadata`` holds the exact `Scene`."""

    config_class = ShapesConfig

    def __init__(self, config: ShapesConfig | None = None):
        self.config = config or ShapesConfig()

    def __len__(self) -> int:
        return self.config.num_samples

    def scene(self, index: int) -> Scene:
        """The ground truth of sample ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"index must be in [0, {len(self)}), found {index}")
        c = self.config
        rng = random.Random(f"shapes:{c.seed}:{c.split}:{index}")
        kind = c.kinds[rng.randrange(len(c.kinds))]
        return sample_scene(rng, kind, c.max_count)

    def load(self, index: int) -> ImageTextSample:
        scene = self.scene(index)
        image = render_scene(scene, self.config.size, self.config.size)
        return ImageTextSample(key=f"shapes/{self.config.split}/{index}", caption=scene.caption,
                               image=image, metadata=scene.to_dict())

    def image_size(self, index: int) -> tuple[int, int]:
        return (self.config.size, self.config.size)
