"""The shapes world: reproducible scenes whose metadata matches the caption and the pixels."""

import json

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
from nextstep.training.data.shapes.world import NUMBER_WORDS

DATASET = ShapesDataset(ShapesConfig(num_samples=10_000, size=64))


@given(st.integers(0, 9_999))
def test_scene_metadata_round_trips_and_matches_its_caption(index):
    scene = DATASET.scene(index)
    assert scene == DATASET.scene(index)  # a pure function of (seed, split, index)
    assert Scene.from_json(json.dumps(json.loads(scene.to_json()))) == scene
    words = scene.caption.split()
    for obj in scene.objects:
        left, top, right, bottom = obj.bbox(1, 1)
        assert 0 <= left and right <= 1 and 0 <= top and bottom <= 1
        assert obj.colour in words and (obj.shape in words or obj.shape + "s" in words)
    if scene.kind == "counting":
        assert words[0] == NUMBER_WORDS[len(scene.objects)]
        assert len(scene.counts()) == 1
    if scene.kind == "position":
        assert scene.relation.relation in scene.caption
        assert relation_holds(scene)
    if scene.kind == "colour_binding":
        assert scene.objects[0].colour != scene.objects[1].colour


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
