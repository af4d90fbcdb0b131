"""Shapes captioning: which captions state a scene truly, and the evaluation that scores a model's."""

import json
import random

from hypothesis import given
from hypothesis import strategies as st

from nextstep.evaluation.shapes_captioning import caption_scenes, run_shapes_captioning
from nextstep.training.data.shapes.captions import grammar_captions, true_captions
from nextstep.training.data.shapes.metadata import SCENE_KINDS, Scene, ShapeObject
from nextstep.training.data.shapes.world import sample_scene

OPPOSITE = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below",
            "below": "above"}


@given(kind=st.sampled_from(SCENE_KINDS), seed=st.integers(0, 10**6))
def test_a_scenes_true_captions_include_its_own_and_are_all_grammatical(kind, seed):
    scene = sample_scene(random.Random(seed), kind)
    captions = true_captions(scene)
    assert scene.caption in captions
    assert captions <= grammar_captions()
    for caption in captions:
        for words, opposite in OPPOSITE.items():
            if f" {words} " in caption:  # the same relation read from the other object
                subject, reference = caption.split(f" {words} ")
                assert f"{reference} {opposite} {subject}" in captions


def test_true_captions_state_every_object_and_nothing_false():
    one = Scene((ShapeObject("circle", "red", (0.5, 0.5), 0.4),), "a circle", "single_object")
    assert true_captions(one) == {"a circle", "a red circle"}
    mixed = Scene((ShapeObject("square", "red", (0.2, 0.5), 0.2), ShapeObject("square", "blue", (0.7, 0.5), 0.2),
                   ShapeObject("square", "red", (0.5, 0.2), 0.2)), "three squares", "counting")
    assert true_captions(mixed) == {"three squares"}
    same = Scene(mixed.objects[:1] + mixed.objects[2:], "two squares", "counting")
    assert true_captions(same) == {"two squares", "two red squares"}
    pair = Scene((ShapeObject("circle", "red", (0.2, 0.5), 0.2), ShapeObject("triangle", "blue", (0.8, 0.5), 0.2)),
                 "a circle and a triangle", "two_object")
    captions = true_captions(pair)
    assert {"a circle and a triangle", "a triangle and a circle", "a red circle and a blue triangle",
            "a circle to the left of a triangle", "a blue triangle to the right of a red circle"} <= captions
    assert not captions & {"a circle", "a circle above a triangle", "a blue circle and a red triangle",
                           "a circle to the right of a triangle", "two circles"}


def test_every_kind_is_drawn_from_seen_and_held_out_combinations():
    plan = caption_scenes(scenes_per_group=2, seed=3)
    groups = {(kind, combinations) for kind, combinations, _ in plan}
    assert ("single_object", "seen") in groups and ("single_object", "held_out") not in groups
    assert {kind for kind, combinations in groups if combinations == "held_out"} == set(SCENE_KINDS) - {
        "single_object"}
    assert len(plan) == 2 * len(groups)
    assert [s.caption for _, _, s in plan] == [s.caption for _, _, s in caption_scenes(scenes_per_group=2, seed=3)]


def test_the_scene_captions_score_one_and_the_files_are_written(tiny_model, tmp_path, monkeypatch):
    plan = iter(caption_scenes(scenes_per_group=2))

    class Written:
        def __init__(self, texts):
            self.texts = texts

    def oracle(model, images, **kwargs):
        return Written([next(plan)[2].caption for _ in images])

    monkeypatch.setattr("nextstep.text_generation.caption_images", oracle)
    report = run_shapes_captioning(tiny_model, tmp_path, scenes_per_group=2, batch_size=4)
    assert report.seen == report.held_out == report.grammatical == report.exact == 1.0
    assert set(report.per_group.values()) == {1.0}
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == report.scenes == 30
    assert json.loads((tmp_path / "report.json").read_text())["seen"] == 1.0
    assert "held-out combinations" in (tmp_path / "report.md").read_text()


def test_a_real_model_is_scored_end_to_end(tiny_model):
    report = run_shapes_captioning(tiny_model, scenes_per_group=1, size=32, max_new_tokens=4)
    assert report.scenes == 15
    for value in (report.seen, report.held_out, report.grammatical, report.exact, *report.per_group.values()):
        assert 0.0 <= value <= 1.0
    assert report.settings["decoding"] == "greedy"


def test_each_scene_is_read_from_its_own_seed_whatever_the_batch(tiny_model, monkeypatch):
    import nextstep.text_generation as text_generation

    seeds, real = [], text_generation.encode_each

    def recording(model, images, image_seeds=None):
        seeds.extend(image_seeds)
        return real(model, images, image_seeds)

    monkeypatch.setattr(text_generation, "encode_each", recording)
    run_shapes_captioning(tiny_model, scenes_per_group=1, size=32, max_new_tokens=1, batch_size=4, seed=7)
    assert seeds == [7 + index for index in range(15)]


def test_no_scenes_per_group_is_refused_before_captioning(tiny_model, tmp_path):
    import pytest

    for name, value in (("scenes_per_group", 0), ("batch_size", 0), ("scenes_per_group", 1.5)):
        with pytest.raises(ValueError, match=f"{name} must be an integer >= 1, found {value!r}"):
            run_shapes_captioning(tiny_model, tmp_path / "out", **{name: value})
    assert not (tmp_path / "out").exists()


def test_any_true_caption_is_correct_not_only_the_scene_s_own(monkeypatch):
    from nextstep.evaluation.shapes_captioning import caption_scenes, run_shapes_captioning
    from nextstep.training.data.shapes.captions import true_captions

    plan = iter(caption_scenes(scenes_per_group=1))

    class Written:
        def __init__(self, texts):
            self.texts = texts

    def other_true_caption(scene):
        others = sorted(true_captions(scene) - {scene.caption})
        return others[0] if others else scene.caption

    monkeypatch.setattr("nextstep.text_generation.caption_images",
                        lambda model, images, **kwargs: Written([other_true_caption(next(plan)[2]) for _ in images]))
    report = run_shapes_captioning(None, scenes_per_group=1, size=32, batch_size=4)
    assert report.seen == report.held_out == 1.0 and report.exact < 1.0


def test_seen_and_held_out_scores_each_count_only_their_own_scenes(monkeypatch):
    plan = iter(caption_scenes(scenes_per_group=2))

    class Written:
        def __init__(self, texts):
            self.texts = texts

    def right_on_seen_only(model, images, **kwargs):
        texts = []
        for _ in images:
            _, combinations, scene = next(plan)
            texts.append(scene.caption if combinations == "seen" else "not a caption")
        return Written(texts)

    monkeypatch.setattr("nextstep.text_generation.caption_images", right_on_seen_only)
    report = run_shapes_captioning(None, scenes_per_group=2, size=32, batch_size=4)
    assert report.seen == 1.0 and report.held_out == 0.0
    assert all(value == (1.0 if group.endswith("/seen") else 0.0) for group, value in report.per_group.items())
    seen_scenes = sum(combinations == "seen" for _, combinations, _ in caption_scenes(scenes_per_group=2))
    assert report.exact == report.grammatical == seen_scenes / report.scenes
