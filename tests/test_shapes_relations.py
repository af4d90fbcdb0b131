"""Spatial relations of the shapes world: the captioning axis rule and GenEval's box rule."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nextstep.training.data.shapes.relations import box_relations, centres_satisfy

MIRROR = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

coordinate = st.floats(-100, 100, allow_nan=False)
extent = st.floats(0.5, 40, allow_nan=False)
box = st.builds(lambda x, y, w, h: (x, y, x + w, y + h), coordinate, coordinate, extent, extent)


@pytest.mark.parametrize("subject, reference, expected", [
    ((0, 0, 10, 10), (30, 0, 40, 10), {"left of"}),
    ((30, 0, 40, 10), (0, 0, 10, 10), {"right of"}),
    ((0, 0, 10, 10), (0, 12, 10, 22), {"above"}),
    ((0, 40, 10, 50), (0, 0, 10, 10), {"below"}),
    ((0, 0, 10, 10), (40, 40, 50, 50), {"left of", "above"}),  # a far diagonal holds both
    ((0, 0, 10, 10), (1, 1, 11, 11), set()),  # closer than the threshold on both axes
    ((0, 0, 10, 10), (0, 0, 10, 10), set()),
])
def test_box_relations_examples(subject, reference, expected):
    assert box_relations(subject, reference) == expected


def test_the_threshold_scales_with_the_boxes():
    # Centres 12 apart, boxes 10 tall: a relation at GenEval's 0.1, none at 0.6.
    assert box_relations((0, 0, 10, 10), (0, 12, 10, 22), threshold=0.1) == {"above"}
    assert box_relations((0, 0, 10, 10), (0, 12, 10, 22), threshold=0.6) == set()
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        box_relations((0, 0, 1, 1), (2, 2, 3, 3), threshold=-0.1)


@given(box, box)
def test_swapping_the_boxes_mirrors_the_relations(a, b):
    assert box_relations(b, a) == {MIRROR[r] for r in box_relations(a, b)}


@given(box, box, st.floats(0.1, 10), coordinate, coordinate)
def test_relations_do_not_depend_on_the_unit_or_origin(a, b, scale, dx, dy):
    def moved(bx):
        return (bx[0] * scale + dx, bx[1] * scale + dy, bx[2] * scale + dx, bx[3] * scale + dy)

    shares = box_relations(a, b)
    # Offsets within rounding error of a decision boundary may flip; compare away from them.
    if shares == box_relations(a, b, threshold=0.1 + 1e-6) == box_relations(a, b, threshold=0.1 - 1e-6):
        assert box_relations(moved(a), moved(b)) == shares


@given(box, box, st.sampled_from(sorted(MIRROR)))
def test_the_captioning_rule_implies_the_box_rule_without_threshold(a, b, relation):
    centre = lambda bx: ((bx[0] + bx[2]) / 2, (bx[1] + bx[3]) / 2)  # noqa: E731
    if centres_satisfy(relation, centre(a), centre(b)):
        assert relation in box_relations(a, b, threshold=0.0)


def test_the_axis_rule_names_unknown_relations():
    with pytest.raises(ValueError, match="relation must be one of"):
        centres_satisfy("behind", (0, 0), (1, 1))


def test_the_axis_rule_needs_an_offset_beyond_the_margin_in_the_relations_direction():
    assert centres_satisfy("left of", (0.2, 0.5), (0.5, 0.5), margin=0.1)
    assert not centres_satisfy("left of", (0.45, 0.5), (0.5, 0.5), margin=0.1)  # within the margin
    assert not centres_satisfy("left of", (0.55, 0.5), (0.5, 0.5), margin=0.1)  # right of it
    assert not centres_satisfy("right of", (0.55, 0.5), (0.5, 0.5), margin=0.1)
    assert not centres_satisfy("above", (0.5, 0.45), (0.5, 0.5), margin=0.1)
    assert not centres_satisfy("below", (0.5, 0.55), (0.5, 0.5), margin=0.1)
    assert centres_satisfy("below", (0.5, 0.8), (0.5, 0.5), margin=0.1)


def test_the_threshold_takes_its_share_of_both_boxes_whole_extents():
    # Centres 12 apart, boxes 10 tall: at 0.5 the offset loses 0.5 * 20 = 10 of its 12, too little is left.
    assert box_relations((0, 0, 10, 10), (0, 12, 10, 22), threshold=0.5) == set()
    # Centres 30 apart: 30 - 10 = 20 of 30 is left, beyond one half.
    assert box_relations((0, 0, 10, 10), (0, 30, 10, 40), threshold=0.5) == {"above"}
