"""The shapes world: random scenes of coloured shapes with captions that state their content.

Scene ``i`` is a pure function of ``(seed, split, i)``, so the dataset needs no
files and its ground truth (`Scene`) is exact. Captions test the six skills of
GenEval: a single object, two objects, counting (two to four of a kind),
colours, position (left of / right of / above / below) and colour attribution
(two objects, each with its own colour). Training data leaves out the held-out
combinations of `nextstep.training.data.shapes.combinations`, so evaluation
prompts are new to a trained model.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from nextstep.config import Config, require
from nextstep.training.data.base import ImageTextDataset, ImageTextSample
from nextstep.training.data.registry import register_dataset
from nextstep.training.data.shapes.combinations import (
    COMBINATION_MODES,
    combination_key,
    held_out_keys,
    in_combinations,
    tag_of,
)
from nextstep.training.data.shapes.metadata import (
    COLOURS,
    RELATIONS,
    SCENE_KINDS,
    SHAPES,
    Relation,
    Scene,
    ShapeObject,
)
from nextstep.training.data.shapes.relations import POSITION_THRESHOLD, box_relations, centres_satisfy
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
    return shape_phrase(obj.shape, obj.colour)


def boxes_overlap(box, boxes, margin: float) -> bool:
    """Whether ``box`` (left, top, right, bottom) comes within ``margin`` of any of ``boxes``."""
    left, top, right, bottom = box
    return any(
        left < other_right + margin and other_left - margin < right
        and top < other_bottom + margin and other_top - margin < bottom
        for other_left, other_top, other_right, other_bottom in boxes
    )


def free_spot(rng: random.Random, objects, size: float, attempts: int = 200) -> tuple[float, float] | None:
    """A centre where a new object of side ``size`` keeps clear of ``objects`` (and of the
    border), or None when ``attempts`` random tries all fail."""
    boxes = [(o.center[0] - o.size / 2, o.center[1] - o.size / 2, o.center[0] + o.size / 2,
              o.center[1] + o.size / 2) for o in objects]
    half = size / 2
    for _ in range(attempts):
        cx, cy = rng.uniform(half + 0.02, 1 - half - 0.02), rng.uniform(half + 0.02, 1 - half - 0.02)
        if not boxes_overlap((cx - half, cy - half, cx + half, cy + half), boxes, margin=0.03):
            return (cx, cy)
    return None


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


#: Extra box threshold a captioned relation must clear beyond GenEval's, so that
#: ground truth still scores correct after its boxes are rounded to pixels.
RELATION_SLACK = 0.05


def _holds(relation: str, subject: ShapeObject, reference: ShapeObject, margin: float = 0.1) -> bool:
    """Whether a caption may state ``relation``: the axis rule with ``margin``, and GenEval's box rule with slack."""
    return centres_satisfy(relation, subject.center, reference.center, margin) and relation in box_relations(
        subject.drawn_box(), reference.drawn_box(), POSITION_THRESHOLD + RELATION_SLACK)


def relation_holds(scene: Scene) -> bool:
    """Whether a ``position`` scene's objects satisfy its stated relation (by both rules of `_holds`)."""
    if scene.relation is None:
        return True
    rel = scene.relation
    return _holds(rel.relation, scene.objects[rel.subject], scene.objects[rel.reference], margin=0.0)


def shape_phrase(shape: str, colour: str | None = None) -> str:
    """``"a circle"``, or ``"a red circle"`` with a colour."""
    words = f"{colour} {shape}" if colour else shape
    return f"{_article(words)} {words}"


def count_phrase(count: int, shape: str, colour: str | None = None) -> str:
    """``"three circles"``, or ``"three red circles"`` with a colour."""
    words = [NUMBER_WORDS[count]] + ([colour] if colour else []) + [_plural(shape)]
    return " ".join(words)


def position_phrase(subject: str, relation: str, reference: str) -> str:
    """``"<subject> to the left of <reference>"`` for two object phrases."""
    return f"{subject} {RELATION_WORDS[relation]} {reference}"


#: Size ranges (fractions of the image side) by how many objects a scene holds.
SIZE_RANGES = {1: (0.3, 0.6), 2: (0.22, 0.34)}
COUNTING_SIZES = (0.16, 0.26)


def _draw_scene(rng: random.Random, kind: str, max_count: int, shapes: tuple[str, ...],
                colours: tuple[str, ...]) -> Scene | None:
    """One scene of ``kind``, or None when the random placement failed."""
    colour_list = list(colours)
    if kind in ("single_object", "colors"):
        spots = _place(rng, 1, SIZE_RANGES[1])
        if spots is None:
            return None
        obj = ShapeObject(rng.choice(shapes), rng.choice(colours), *spots[0])
        caption = shape_phrase(obj.shape) if kind == "single_object" else object_phrase(obj)
        return Scene((obj,), caption, kind)
    if kind in ("counting", "colour_counting"):
        count = rng.randint(2, max_count)
        spots = _place(rng, count, COUNTING_SIZES)
        if spots is None:
            return None
        shape = rng.choice(shapes)
        if kind == "counting":
            objects = tuple(ShapeObject(shape, rng.choice(colours), c, s) for c, s in spots)
            return Scene(objects, count_phrase(count, shape), kind)
        colour = rng.choice(colours)
        objects = tuple(ShapeObject(shape, colour, c, s) for c, s in spots)
        return Scene(objects, count_phrase(count, shape, colour), kind)
    if kind in ("two_object", "color_attr", "position", "colour_position"):
        spots = _place(rng, 2, SIZE_RANGES[2])
        if spots is None:
            return None
        first_shape, second_shape = rng.sample(list(shapes), 2)
        if kind in ("two_object", "position"):
            first_colour, second_colour = rng.choice(colours), rng.choice(colours)
        else:
            first_colour, second_colour = rng.sample(colour_list, 2)
        objects = (ShapeObject(first_shape, first_colour, *spots[0]),
                   ShapeObject(second_shape, second_colour, *spots[1]))
        coloured = kind in ("color_attr", "colour_position")
        phrases = [object_phrase(o) if coloured else shape_phrase(o.shape) for o in objects]
        if kind in ("two_object", "color_attr"):
            return Scene(objects, f"{phrases[0]} and {phrases[1]}", kind)
        relation = rng.choice(RELATIONS)
        if not _holds(relation, objects[0], objects[1]):
            return None
        return Scene(objects, position_phrase(phrases[0], relation, phrases[1]), kind, Relation(0, relation, 1))
    raise ValueError(f"scene kind must be one of {list(SCENE_KINDS)}, found {kind!r}")


#: Draws `sample_scene` makes before it gives up (a held-out combination takes about 30 on average).
MAX_DRAWS = 10_000


def sample_scene(rng: random.Random, kind: str, max_count: int = 4,
                 shapes: tuple[str, ...] = SHAPES, colours: tuple[str, ...] = tuple(COLOURS),
                 combinations: str = "all") -> Scene:
    """Draw one scene of ``kind`` with ``rng``.

    Args:
        rng: the random source (a seeded `random.Random` gives a reproducible scene).
        kind: one of `SCENE_KINDS`.
        max_count: largest count of a counting scene.
        shapes: shape names to draw from (at least two).
        colours: colour names to draw from (at least two).
        combinations: ``all``; ``seen``: never a held-out combination
            (`nextstep.training.data.shapes.combinations`); ``held_out``: only those.

    Raises:
        ValueError: an unknown kind or mode, or no scene of the combinations asked for within
            `MAX_DRAWS` draws (shapes and colours that cannot make one).
    """
    if kind not in SCENE_KINDS:
        raise ValueError(f"scene kind must be one of {list(SCENE_KINDS)}, found {kind!r}")
    if combinations not in COMBINATION_MODES:
        raise ValueError(f"combinations must be one of {list(COMBINATION_MODES)}, found {combinations!r}")
    if combinations == "held_out" and not held_out_keys(tag_of(kind)):
        raise ValueError(f"scene kind {kind!r} has no held-out combinations")
    for _ in range(MAX_DRAWS):
        scene = _draw_scene(rng, kind, max_count, shapes, colours)
        if scene is None:
            continue
        if in_combinations(tag_of(kind), combination_key(scene), combinations):
            return scene
    raise ValueError(f"no {combinations!r} {kind} scene in {MAX_DRAWS} draws from shapes {list(shapes)}, colours "
                     f"{list(colours)} and counts up to {max_count}: those can hardly or never make one")


def drawable_kinds(kinds: tuple[str, ...], combinations: str) -> tuple[str, ...]:
    """The scene kinds a source of ``combinations`` draws from: all of ``kinds``, or for
    ``held_out`` those that have held-out combinations."""
    if combinations == "held_out":
        return tuple(kind for kind in kinds if held_out_keys(tag_of(kind)))
    return tuple(kinds)


@dataclass
class ShapesConfig(Config):
    """The shapes world as a dataset.

    Args:
        num_samples: length of the dataset (scenes are drawn on demand).
        size: image side in pixels.
        seed: base seed of the scenes.
        split: ``train`` or ``test``; the splits draw from different seeds.
        kinds: scene kinds to mix (equally likely).
        max_count: largest count of a counting scene (2..6).
        combinations: ``seen`` (the default) leaves out the held-out combinations,
            ``held_out`` draws only those (kinds without any are skipped), ``all`` both.
    """

    num_samples: int = 10000
    size: int = 64
    seed: int = 0
    split: str = "train"
    kinds: tuple[str, ...] = SCENE_KINDS
    max_count: int = 4
    combinations: str = "seen"

    def validate(self) -> None:
        require(self.num_samples >= 1, "num_samples", self.num_samples, ">= 1")
        require(self.size >= 8, "size", self.size, ">= 8")
        require(self.split in ("train", "test"), "split", self.split, "'train' or 'test'")
        require(len(self.kinds) > 0 and all(k in SCENE_KINDS for k in self.kinds), "kinds", self.kinds,
                f"a non-empty subset of {list(SCENE_KINDS)}")
        require(2 <= self.max_count <= 6, "max_count", self.max_count, "in [2, 6]")
        require(self.combinations in COMBINATION_MODES, "combinations", self.combinations,
                f"one of {list(COMBINATION_MODES)}")
        if self.combinations == "held_out":
            require(any(held_out_keys(tag_of(k)) for k in self.kinds), "kinds", self.kinds,
                    "at least one kind with held-out combinations")


@register_dataset("shapes")
class ShapesDataset(ImageTextDataset):
    """Rendered shapes scenes with captions; ``metadata`` holds the exact `Scene`."""

    config_class = ShapesConfig

    def __init__(self, config: ShapesConfig | None = None):
        self.config = config or ShapesConfig()
        self.kinds = drawable_kinds(self.config.kinds, self.config.combinations)

    def __len__(self) -> int:
        return self.config.num_samples

    def scene(self, index: int) -> Scene:
        """The ground truth of sample ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"index must be in [0, {len(self)}), found {index}")
        c = self.config
        rng = random.Random(f"shapes:{c.seed}:{c.split}:{index}")
        kind = self.kinds[rng.randrange(len(self.kinds))]
        return sample_scene(rng, kind, c.max_count, combinations=c.combinations)

    def load(self, index: int) -> ImageTextSample:
        scene = self.scene(index)
        image = render_scene(scene, self.config.size, self.config.size)
        return ImageTextSample(key=f"shapes/{self.config.split}/{index}", caption=scene.caption,
                               image=image, metadata=scene.to_dict())

    def caption(self, index: int) -> str:
        return self.scene(index).caption

    def image_size(self, index: int) -> tuple[int, int]:
        return (self.config.size, self.config.size)
