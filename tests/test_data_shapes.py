"""The shapes world: reproducible scenes whose metadata matches the caption and the pixels."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nextstep.training.data.shapes import (
    COLOURS,
    Scene,
    ShapesConfig,
    ShapesDataset,
    relation_holds,
    render_scene,
)
from nextstep.training.data.shapes.combinations import (
    GENEVAL_TAGS,
    all_keys,
    combination_key,
    held_out_keys,
    is_held_out,
    tag_of,
)
from nextstep.training.data.shapes.world import NUMBER_WORDS

DATASET = ShapesDataset(ShapesConfig(num_samples=10_000, size=64))


@given(st.integers(0, 9_999))
def test_scene_metadata_round_trips_and_matches_its_caption(index):
    scene = DATASET.scene(index)
    assert scene == DATASET.scene(index)  # a pure function of (seed, split, index)
    assert Scene.from_json(json.dumps(json.loads(scene.to_json()))) == scene
    words = scene.caption.split()
    coloured = scene.kind in ("colors", "color_attr", "colour_counting", "colour_position")
    for obj in scene.objects:
        left, top, right, bottom = obj.bbox(1, 1)
        assert 0 <= left and right <= 1 and 0 <= top and bottom <= 1
        assert obj.shape in words or obj.shape + "s" in words
    if coloured:
        assert all(obj.colour in words for obj in scene.objects)
    else:
        assert not set(COLOURS) & set(words)
    if scene.kind in ("counting", "colour_counting"):
        assert words[0] == NUMBER_WORDS[len(scene.objects)]
        assert len({o.shape for o in scene.objects}) == 1
    if scene.kind == "colour_counting":
        assert len(scene.counts()) == 1
    if scene.kind in ("position", "colour_position"):
        assert scene.relation.relation in scene.caption
        assert relation_holds(scene)
    if scene.kind in ("two_object", "position", "color_attr", "colour_position"):
        assert scene.objects[0].shape != scene.objects[1].shape
    if scene.kind in ("color_attr", "colour_position"):
        assert scene.objects[0].colour != scene.objects[1].colour
    assert not is_held_out(scene)  # the default dataset is the training side


@given(st.integers(0, 9_999))
def test_rendered_object_centres_have_their_exact_colour(index):
    scene = DATASET.scene(index)
    image = render_scene(scene, 128, 128)
    for obj in scene.objects:
        x, y = obj.center
        assert image.getpixel((int(x * 128), int(y * 128))) == COLOURS[obj.colour]
    assert image.getpixel((0, 0)) == tuple(scene.background)


def test_splits_and_seeds_give_different_scenes():
    train = ShapesDataset(ShapesConfig(num_samples=50))
    test = ShapesDataset(ShapesConfig(num_samples=50, split="test"))
    assert [train.scene(i) for i in range(50)] != [test.scene(i) for i in range(50)]


def test_sample_carries_image_caption_and_metadata():
    sample = ShapesDataset(ShapesConfig(num_samples=3, size=48, kinds=("counting",))).load(2)
    assert sample.image.size == (48, 48) and sample.image.mode == "RGB"
    assert Scene.from_dict(sample.metadata).caption == sample.caption
    assert Scene.from_dict(sample.metadata).kind == "counting"


def test_bad_config_names_the_field():
    import pytest

    with pytest.raises(ValueError, match="kinds"):
        ShapesConfig(kinds=("juggling",))


def test_held_out_combinations_are_a_fixed_proper_subset_that_keeps_every_word_seen():
    sizes = {tag: (len(held_out_keys(tag)), len(all_keys(tag))) for tag in GENEVAL_TAGS}
    assert sizes == {"single_object": (0, 3), "two_object": (3, 6), "counting": (3, 9), "colors": (6, 18),
                     "position": (6, 24), "color_attr": (45, 180)}
    for tag in GENEVAL_TAGS:
        held = held_out_keys(tag)
        seen = set(all_keys(tag)) - held
        assert held <= set(all_keys(tag))
        # Every value of every slot still occurs in some seen combination.
        for slot in range(len(all_keys(tag)[0])):
            assert {k[slot] for k in seen} == {k[slot] for k in all_keys(tag)}


def test_held_out_dataset_draws_only_held_out_combinations():
    held = ShapesDataset(ShapesConfig(num_samples=200, combinations="held_out"))
    assert "single_object" not in held.kinds
    scenes = [held.scene(i) for i in range(200)]
    assert all(is_held_out(s) for s in scenes)
    tags = {s.kind for s in scenes}
    assert {"two_object", "counting", "colors", "position", "color_attr"} <= tags
    for scene in scenes:
        assert combination_key(scene) in held_out_keys(tag_of(scene.kind))


def test_shapes_and_colours_that_cannot_make_a_held_out_scene_are_refused():
    import random

    from nextstep.training.data.shapes.world import sample_scene

    unreachable = r"no 'held_out' colors scene in 10000 draws from shapes \['circle', 'square'\]"
    with pytest.raises(ValueError, match=unreachable):
        sample_scene(random.Random(0), "colors", shapes=("circle", "square"), colours=("blue", "orange"),
                     combinations="held_out")


def test_counting_scenes_reach_every_count_up_to_the_largest():
    counting = ShapesDataset(ShapesConfig(num_samples=120, kinds=("counting", "colour_counting"), max_count=4))
    counts = {len(counting.scene(i).objects) for i in range(120)}
    assert counts == {2, 3, 4}


def test_a_triangle_is_drawn_pointing_up():
    from nextstep.training.data.shapes import ShapeObject

    triangle = ShapeObject("triangle", "blue", (0.5, 0.5), 0.8)
    image = render_scene(Scene((triangle,), "a blue triangle", "colors"), 100, 100)
    left, top, right, bottom = triangle.drawn_box(100, 100)
    near_top, near_bottom = int(top) + 10, int(bottom) - 5
    blue, white = COLOURS["blue"], (255, 255, 255)
    assert image.getpixel((50, near_top)) == blue  # below the apex
    assert image.getpixel((int(left) + 8, near_top)) == white
    assert image.getpixel((int(right) - 8, near_top)) == white
    assert image.getpixel((int(left) + 8, near_bottom)) == blue  # the base's corners
    assert image.getpixel((int(right) - 8, near_bottom)) == blue
