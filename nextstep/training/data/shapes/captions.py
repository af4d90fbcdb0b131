"""Which captions of the shapes world's grammar state a scene truly.

A scene admits several true captions: the colour may be stated or left out
(for a count, only when all the objects share it), two objects may come in
either order, and joined by "and" or by any relation GenEval's box rule grants
on their drawn boxes. `true_captions` lists them; `grammar_captions` lists
every caption the grammar can write. The captioning evaluation scores a
model's captions with them, and preference data uses them to make sure a
rejected image really fails its caption.
"""

from __future__ import annotations

import functools
import itertools

from nextstep.training.data.shapes.metadata import COLOURS, RELATIONS, SHAPES, Scene, ShapeObject
from nextstep.training.data.shapes.relations import box_relations
from nextstep.training.data.shapes.world import NUMBER_WORDS, count_phrase, position_phrase, shape_phrase


def _pair_captions(first: ShapeObject, second: ShapeObject) -> set[str]:
    """Captions of two objects of different shapes: either one first, bare or both coloured,
    joined by 'and' or by a relation that holds by GenEval's box rule."""
    captions = set()
    for subject, reference in ((first, second), (second, first)):
        relations = box_relations(subject.drawn_box(), reference.drawn_box())
        for coloured in (False, True):
            phrases = [shape_phrase(o.shape, o.colour if coloured else None) for o in (subject, reference)]
            captions.add(f"{phrases[0]} and {phrases[1]}")
            captions.update(position_phrase(phrases[0], relation, phrases[1]) for relation in relations)
    return captions


def true_captions(scene: Scene) -> frozenset[str]:
    """Every caption of the world's grammar that states the whole of ``scene`` truly.

    One object: its shape, with or without its colour. Several of one shape: their
    count, with the colour when they share one. Two objects of different shapes:
    ``"X and Y"`` in either order, or ``"X <relation> Y"`` for each relation that
    holds by GenEval's box rule, the objects bare or both coloured. The scene's own
    caption is always among them.
    """
    objects = scene.objects
    captions = {scene.caption}
    shapes = {o.shape for o in objects}
    if len(objects) == 1:
        captions |= {shape_phrase(objects[0].shape), shape_phrase(objects[0].shape, objects[0].colour)}
    elif len(shapes) == 1:
        (shape,) = shapes
        captions.add(count_phrase(len(objects), shape))
        colours = {o.colour for o in objects}
        if len(colours) == 1:
            captions.add(count_phrase(len(objects), shape, colours.pop()))
    elif len(objects) == 2:
        captions |= _pair_captions(*objects)
    return frozenset(captions)


@functools.lru_cache(maxsize=1)
def grammar_captions() -> frozenset[str]:
    """Every caption the world's grammar can write (any shapes, colours, counts and relations)."""
    colours = (None, *COLOURS)
    captions = {shape_phrase(shape, colour) for shape in SHAPES for colour in colours}
    captions |= {count_phrase(count, shape, colour) for count in NUMBER_WORDS if count > 1
                 for shape in SHAPES for colour in colours}
    for first, second in itertools.permutations(SHAPES, 2):
        pairs = [(None, None), *itertools.product(COLOURS, COLOURS)]
        for first_colour, second_colour in pairs:
            phrases = shape_phrase(first, first_colour), shape_phrase(second, second_colour)
            captions.add(f"{phrases[0]} and {phrases[1]}")
            captions |= {position_phrase(phrases[0], relation, phrases[1]) for relation in RELATIONS}
    return frozenset(captions)
