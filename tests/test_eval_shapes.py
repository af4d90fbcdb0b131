"""Shapes GenEval: the exact detector, GenEval's scoring rule, held-out prompts, the written report."""

import json
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from nextstep.evaluation.sampling import SamplingSettings
from nextstep.evaluation.shapes_detector import detect_shapes
from nextstep.evaluation.shapes_geneval import (
    geneval_entry,
    geneval_prompts,
    run_shapes_geneval,
    score_image,
    tokenizer_ceiling,
)
from nextstep.training.data.shapes import SCENE_KINDS, ShapesConfig, ShapesDataset, render_scene, sample_scene
from nextstep.training.data.shapes.combinations import (
    COLOURED_VARIANTS,
    GENEVAL_TAGS,
    combination_key,
    held_out_keys,
    tag_of,
)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from(SCENE_KINDS), st.sampled_from([64, 96]))
def test_detector_recovers_every_rendered_object(seed, kind, size):
    scene = sample_scene(random.Random(seed), kind)
    detections = detect_shapes(render_scene(scene, size, size))
    assert Counter((d.colour, d.shape) for d in detections) == scene.counts()
    for obj in scene.objects:
        nearest = min(detections, key=lambda d: abs(d.center[0] - obj.center[0]) + abs(d.center[1] - obj.center[1]))
        assert abs(nearest.center[0] - obj.center[0]) < 1.5 / size
        assert abs(nearest.center[1] - obj.center[1]) < 1.5 / size


def test_detector_rejects_bad_input_and_finds_nothing_on_a_blank_image():
    assert detect_shapes(Image.new("RGB", (64, 64), "white")) == []
    import numpy as np

    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        detect_shapes(np.zeros((64, 64)))


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000))
def test_ground_truth_of_every_held_out_scene_scores_correct(index):
    dataset = ShapesDataset(ShapesConfig(num_samples=10_001, combinations="held_out", split="test"))
    scene = dataset.scene(index)
    tag = tag_of(scene.kind)
    entry = geneval_entry(tag, combination_key(scene))
    correct, reason = score_image(detect_shapes(render_scene(scene, 64, 64)), entry)
    assert correct, reason
    if scene.kind not in COLOURED_VARIANTS:
        assert entry["prompt"] == scene.caption  # the prompt a model is asked is the caption form it learnt


def _scene_image(kind, seed):
    scene = sample_scene(random.Random(seed), kind)
    return scene, render_scene(scene, 64, 64)


def test_wrong_images_fail_with_a_reason():
    scene, image = _scene_image("position", 1)
    key = combination_key(scene)
    subject, relation, reference = key
    opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[relation]
    correct, reason = score_image(detect_shapes(image), geneval_entry("position", (subject, opposite, reference)))
    assert not correct and "is not" in reason

    scene, image = _scene_image("counting", 3)
    count, shape = combination_key(scene)
    correct, reason = score_image(detect_shapes(image), geneval_entry("counting", (count - 1, shape)))
    assert not correct and "fewer than" in reason
    if count < 4:
        assert not score_image(detect_shapes(image), geneval_entry("counting", (count + 1, shape)))[0]

    scene, image = _scene_image("colors", 5)
    colour, shape = combination_key(scene)
    other = "blue" if colour != "blue" else "red"
    correct, reason = score_image(detect_shapes(image), geneval_entry("colors", (other, shape)))
    assert not correct and other in reason
    blank = Image.new("RGB", (64, 64), "white")
    assert not any(score_image([], entry)[0] for entry in geneval_prompts())
    assert detect_shapes(blank) == []


def test_held_out_prompts_never_occur_as_training_captions():
    prompts = {e["prompt"] for e in geneval_prompts() if e["tag"] != "single_object"}
    assert len(prompts) == sum(len(held_out_keys(t)) for t in GENEVAL_TAGS)
    training = ShapesDataset(ShapesConfig(num_samples=4000))
    captions = {training.scene(i).caption for i in range(4000)}
    assert not prompts & captions
    # The same prompts in the uncoloured categories are caption forms training uses for other keys.
    all_prompts = {e["prompt"] for e in geneval_prompts("all")}
    assert len(captions & all_prompts) > 50


def test_seen_and_held_out_prompts_split_every_prompt():
    held_out, seen, every = (geneval_prompts(c) for c in ("held_out", "seen", "all"))
    single = [e for e in every if e["tag"] == "single_object"]
    assert [e for e in seen if e["tag"] == "single_object"] == single  # nothing held out: in both
    assert [e for e in held_out if e["tag"] == "single_object"] == single
    rest = lambda entries: {e["prompt"] for e in entries if e["tag"] != "single_object"}  # noqa: E731
    assert rest(seen) | rest(held_out) == rest(every) and not rest(seen) & rest(held_out)
    assert {e["tag"] for e in seen} == set(GENEVAL_TAGS)
    with pytest.raises(ValueError, match="combinations must be one of"):
        geneval_prompts("train")


def test_run_writes_report_json_markdown_and_grid(tmp_path):
    from nextstep.builders import build_model

    model = build_model("tiny", seed=0)
    report = run_shapes_geneval(model, tmp_path, images_per_tag=2,
                                settings=SamplingSettings(num_steps=2, batch_size=6))
    saved = json.loads((tmp_path / "report.json").read_text())
    assert set(saved["per_tag"]) == set(GENEVAL_TAGS) and saved["images_per_tag"]["counting"] == 2
    assert saved["overall"] == pytest.approx(sum(saved["per_tag"].values()) / 6)
    assert report.overall == saved["overall"]
    assert "| **overall** |" in (tmp_path / "report.md").read_text()
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 12 and all("reason" in json.loads(line) for line in lines)
    assert Image.open(tmp_path / "samples.png").size == (2 * 64, 6 * 64)
    assert set(saved["tokenizer_ceiling"]) == set(GENEVAL_TAGS)
    assert "tokenizer ceiling" in (tmp_path / "report.md").read_text()
    assert saved["combinations"] == "held_out"
    assert set(saved["empty"]) == set(GENEVAL_TAGS) and all(0 <= v <= 1 for v in saved["empty"].values())
    assert "| empty |" in (tmp_path / "report.md").read_text()
    assert all(len(d["box"]) == 4 for line in lines for d in json.loads(line)["detections"])
    seen = run_shapes_geneval(model, images_per_tag=1, settings=SamplingSettings(num_steps=1, batch_size=6),
                              with_ceiling=False, combinations="seen")
    assert seen.combinations == "seen" and seen.tokenizer_ceiling == {}


def test_the_shipped_tokenizer_keeps_ground_truth_readable():
    """Ground truth through the shipped model's tokenizer still scores (nearly) correct: the
    detector forgives the tokenizer's softer edges, so a model's score is not capped by them."""
    from nextstep.model import NextStep
    from nextstep.pretrained import DEFAULT_MODEL, bundled_model_path

    model = NextStep.from_pretrained(bundled_model_path(DEFAULT_MODEL)).eval()
    ceiling = tokenizer_ceiling(model, images_per_tag=16)
    assert set(ceiling) == set(GENEVAL_TAGS)
    assert sum(ceiling.values()) / len(ceiling) >= 0.9, ceiling
    assert min(ceiling.values()) >= 0.75, ceiling


def test_the_detector_refuses_images_that_are_not_uint8():
    import numpy as np

    image = np.asarray(render_scene(sample_scene(random.Random(0), "single_object"), 64, 64))
    assert len(detect_shapes(image)) == 1
    with pytest.raises(ValueError, match=r"uint8 values in \[0, 255\], found float32 values in \[0\.1333, 1\]"):
        detect_shapes(image.astype(np.float32) / 255)  # would otherwise read as near black: nothing found
    with pytest.raises(ValueError, match=r"found int64 values in \[34, 255\]"):
        detect_shapes(image.astype(np.int64))


def test_the_tokenizer_ceiling_draws_the_given_combinations_at_the_given_size(monkeypatch):
    from nextstep.builders import build_model
    from nextstep.evaluation import shapes_geneval
    from nextstep.training.data.shapes.combinations import is_held_out

    scenes, sizes = [], []
    real_sample, real_render = shapes_geneval.sample_scene, shapes_geneval.render_scene

    def sample(*args, **kwargs):
        scenes.append(real_sample(*args, **kwargs))
        return scenes[-1]

    def render(scene, width, height):
        sizes.append((height, width))
        return real_render(scene, width, height)

    monkeypatch.setattr(shapes_geneval, "sample_scene", sample)
    monkeypatch.setattr(shapes_geneval, "render_scene", render)
    ceiling = tokenizer_ceiling(build_model("tiny", seed=0), images_per_tag=3, size=(32, 48), combinations="seen")
    assert set(ceiling) == set(GENEVAL_TAGS) and len(scenes) == 3 * len(GENEVAL_TAGS)
    assert not any(is_held_out(scene) for scene in scenes)
    assert set(sizes) == {(32, 48)}
    with pytest.raises(ValueError, match="size must be a positive integer or"):
        tokenizer_ceiling(None, size=(32, 0))


def test_a_run_passes_its_combinations_and_size_to_the_tokenizer_ceiling(monkeypatch):
    from nextstep.evaluation import shapes_geneval

    calls = []
    monkeypatch.setattr(shapes_geneval, "generate_images", lambda model, prompts, settings, progress=None: [
        Image.new("RGB", (settings.width, settings.height), "white") for _ in prompts])
    monkeypatch.setattr(shapes_geneval, "tokenizer_ceiling", lambda *args, **kwargs: calls.append((args, kwargs))
                        or {tag: 1.0 for tag in GENEVAL_TAGS})
    run_shapes_geneval(None, images_per_tag=1, settings=SamplingSettings(height=32, width=48), combinations="seen")
    (args, kwargs), = calls
    assert args[1:3] == (1, (32, 48)) and kwargs == {"combinations": "seen"}


def test_no_images_per_tag_is_refused_before_generating(monkeypatch):
    from nextstep.evaluation import shapes_geneval

    monkeypatch.setattr(shapes_geneval, "generate_images", lambda *args, **kwargs: pytest.fail("generated images"))
    for value in (0, -1, 2.0):
        with pytest.raises(ValueError, match=f"images_per_tag must be an integer >= 1, found {value!r}"):
            run_shapes_geneval(None, images_per_tag=value)
    with pytest.raises(ValueError, match="images_per_tag must be an integer >= 1, found 0"):
        tokenizer_ceiling(None, images_per_tag=0)


def test_an_object_is_judged_by_its_most_confident_detection():
    from nextstep.evaluation.shapes_detector import Detection

    def detection(colour, score):
        return Detection(shape="circle", colour=colour, center=(0.5, 0.5), box=(0, 0, 10, 10), area=50, score=score)

    entry = {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}]}
    assert score_image([detection("blue", 0.2), detection("red", 0.9)], entry)[0]


def test_a_wide_image_places_each_detection_by_fractions_of_its_own_width_and_height():
    from nextstep.training.data.shapes.metadata import Scene, ShapeObject

    scene = Scene((ShapeObject("square", "red", (0.25, 0.75), 0.2),), "", "colors")
    (found,) = detect_shapes(render_scene(scene, 128, 64))  # 128 wide, 64 high
    assert found.shape == "square" and found.colour == "red"
    assert found.center[0] == pytest.approx(0.25, abs=1.5 / 128)
    assert found.center[1] == pytest.approx(0.75, abs=1.5 / 64)


def test_a_detection_box_ends_one_past_its_last_pixel_and_counts_its_pixels():
    import numpy as np

    image = np.full((64, 64, 3), 255, np.uint8)
    image[10:30, 20:40] = (37, 80, 220)  # a blue square: rows 10..29, columns 20..39
    (found,) = detect_shapes(image)
    assert (found.shape, found.colour) == ("square", "blue")
    assert found.box == (20, 10, 40, 30)  # (left, top, right, bottom), right and bottom exclusive
    assert found.area == 400
    assert found.center == pytest.approx((30 / 64, 20 / 64))


def test_the_markdown_report_puts_each_number_under_its_own_column():
    from nextstep.evaluation.shapes_geneval import GenEvalReport

    report = GenEvalReport(overall=0.5, per_tag={"counting": 0.5}, images_per_tag={"counting": 4},
                           tokenizer_ceiling={"counting": 0.875}, empty={"counting": 0.25})
    header, _, row, overall = report.to_markdown().splitlines()
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    cells = dict(zip(columns, (cell.strip() for cell in row.strip("|").split("|"))))
    assert cells == {"category": "counting", "score": "0.500", "images": "4", "empty": "0.25",
                     "tokenizer ceiling": "0.875"}
    totals = dict(zip(columns, (cell.strip() for cell in overall.strip("|").split("|"))))
    assert totals["empty"] == "0.25" and totals["tokenizer ceiling"] == "**0.875**"


def test_the_empty_share_counts_blank_images_not_wrong_ones(monkeypatch):
    from nextstep.evaluation import shapes_geneval
    from nextstep.training.data.shapes.metadata import Scene, ShapeObject

    one_circle = render_scene(Scene((ShapeObject("circle", "red", (0.5, 0.5), 0.3),), "", "colors"), 64, 64)
    for image, empty in ((one_circle, 0.0), (Image.new("RGB", (64, 64), "white"), 1.0)):
        monkeypatch.setattr(shapes_geneval, "generate_images",
                            lambda model, prompts, settings, progress=None, image=image: [image for _ in prompts])
        report = run_shapes_geneval(None, images_per_tag=2, with_ceiling=False, settings=SamplingSettings())
        assert set(report.empty.values()) == {empty}
        assert min(report.per_tag.values()) == 0.0  # a lone red circle is wrong for most prompts


def test_without_settings_the_suites_draw_at_the_model_s_own_generation_settings(tiny_model, monkeypatch):
    from nextstep.evaluation import shapes_geneval

    tiny_model.config = tiny_model.config.replace(generation=tiny_model.config.generation.replace(
        cfg=2.0, num_steps=3, height=32, width=32))
    used = []

    def drawn(model, prompts, settings, progress=None):
        used.append(settings)
        return [Image.new("RGB", (32, 32), "white") for _ in prompts]

    monkeypatch.setattr(shapes_geneval, "generate_images", drawn)
    run_shapes_geneval(tiny_model, images_per_tag=1, with_ceiling=False)
    expected = SamplingSettings.from_defaults(tiny_model.config.generation)
    assert used[-1] == expected and (used[-1].cfg, used[-1].num_steps) == (2.0, 3)
