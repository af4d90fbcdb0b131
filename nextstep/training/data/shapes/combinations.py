"""Which prompt combinations of the shapes world are held out of training.

Every caption reduces to a *combination key*: the part of its content a
compositional benchmark varies. GenEval-style evaluation generates images only
for held-out keys, so its prompts never occur as training captions; the words
that make them up (each colour, shape, count and relation) all do.

======================  ==================================  =====================
tag                     key                                 held out
======================  ==================================  =====================
``single_object``       ``(shape,)``                        none (3 prompts)
``two_object``          ``(first shape, second shape)``     3 of 6 ordered pairs
``counting``            ``(count, shape)``                  3 of 9 (a Latin square)
``colors``              ``(colour, shape)``                 6 of 18 (each colour once)
``position``            ``(subject, relation, reference)``  6 of 24 (one per pair)
``color_attr``          ``(colour, shape, colour, shape)``  a fixed 25% of 180
======================  ==================================  =====================

The coloured training variants count as their uncoloured tag: ``"three red
squares"`` has the ``counting`` key ``(3, "square")``, and ``"a red circle to
the left of a blue square"`` the ``position`` key ``("circle", "left of", "square")``.
"""

from __future__ import annotations

import functools
import hashlib
import itertools

from nextstep.training.data.shapes.metadata import COLOURS, RELATIONS, SHAPES, Scene

#: The six GenEval categories, by GenEval's own tag names.
GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")

#: Training-only scene kinds and the GenEval tag whose key they share.
COLOURED_VARIANTS = {"colour_counting": "counting", "colour_position": "position"}

#: Counts a counting caption can state.
COUNTS = (2, 3, 4)

#: Share of ``color_attr`` keys held out.
COLOR_ATTR_HELD_OUT = 0.25

#: Which combinations a scene source or a prompt list takes: every one, training's, or the held-out ones.
COMBINATION_MODES = ("all", "seen", "held_out")

Key = tuple


def tag_of(kind: str) -> str:
    """The GenEval tag a scene kind is scored and held out under."""
    return COLOURED_VARIANTS.get(kind, kind)


def combination_key(scene: Scene) -> Key:
    """The combination a scene's caption states (see the module table)."""
    objects = scene.objects
    tag = tag_of(scene.kind)
    if tag == "single_object":
        return (objects[0].shape,)
    if tag == "two_object":
        return (objects[0].shape, objects[1].shape)
    if tag == "counting":
        return (len(objects), objects[0].shape)
    if tag == "colors":
        return (objects[0].colour, objects[0].shape)
    if tag == "position":
        rel = scene.relation
        return (objects[rel.subject].shape, rel.relation, objects[rel.reference].shape)
    if tag == "color_attr":
        return (objects[0].colour, objects[0].shape, objects[1].colour, objects[1].shape)
    raise ValueError(f"scene kind {scene.kind!r} has no combination key")


def all_keys(tag: str) -> tuple[Key, ...]:
    """Every combination key of ``tag``, in a fixed order."""
    pairs = [(a, b) for a, b in itertools.product(SHAPES, SHAPES) if a != b]
    if tag == "single_object":
        return tuple((s,) for s in SHAPES)
    if tag == "two_object":
        return tuple(pairs)
    if tag == "counting":
        return tuple(itertools.product(COUNTS, SHAPES))
    if tag == "colors":
        return tuple(itertools.product(COLOURS, SHAPES))
    if tag == "position":
        return tuple((a, rel, b) for a, b in pairs for rel in RELATIONS)
    if tag == "color_attr":
        return tuple((c1, a, c2, b) for c1, c2 in itertools.permutations(COLOURS, 2) for a, b in pairs)
    raise ValueError(f"tag must be one of {list(GENEVAL_TAGS)}, found {tag!r}")


def _stable_fraction(key: Key) -> float:
    digest = hashlib.sha256(repr(key).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@functools.lru_cache(maxsize=None)
def held_out_keys(tag: str) -> frozenset:
    """The combination keys of ``tag`` that training never sees."""
    if tag == "single_object":
        return frozenset()
    if tag == "two_object":
        # A cycle: each shape comes first once and second once; every reversed order stays seen.
        return frozenset((SHAPES[i], SHAPES[(i + 2) % 3]) for i in range(3))
    if tag == "counting":
        return frozenset((count, SHAPES[i]) for i, count in enumerate(COUNTS))
    if tag == "colors":
        return frozenset((colour, SHAPES[i % len(SHAPES)]) for i, colour in enumerate(COLOURS))
    if tag == "position":
        pairs = [(a, b) for a, b in itertools.product(SHAPES, SHAPES) if a != b]
        return frozenset((a, RELATIONS[i % len(RELATIONS)], b) for i, (a, b) in enumerate(pairs))
    if tag == "color_attr":
        keys = sorted(all_keys(tag), key=_stable_fraction)
        return frozenset(keys[: round(COLOR_ATTR_HELD_OUT * len(keys))])
    raise ValueError(f"tag must be one of {list(GENEVAL_TAGS)}, found {tag!r}")


def in_combinations(tag: str, key: Key, combinations: str) -> bool:
    """Whether combination ``key`` of ``tag`` belongs to ``combinations`` (one of `COMBINATION_MODES`)."""
    return combinations == "all" or (key in held_out_keys(tag)) == (combinations == "held_out")


def is_held_out(scene: Scene) -> bool:
    """Whether ``scene``'s caption states a held-out combination."""
    return combination_key(scene) in held_out_keys(tag_of(scene.kind))
