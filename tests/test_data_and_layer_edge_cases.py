"""Edge cases of the training data (shapes world, mixtures, bad-sample tracking, loader, registry, emoji,
Fashion-MNIST) and of the small model layers (rotary tables, RMSNorm, AdaLN blocks, training times)."""

import gzip
import hashlib
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from test_data_emoji import pytestmark as needs_emoji
from test_data_fashion_mnist import pytestmark as needs_fashion_mnist

from nextstep.training.data import fashion_mnist
from nextstep.training.data.base import DataQualityError, ImageTextDataset, ImageTextSample
from nextstep.training.data.shapes import COLOURS, Relation, Scene, ShapeObject, ShapesConfig, ShapesDataset
from nextstep.training.data.shapes.captions import grammar_captions
from nextstep.training.data.shapes.combinations import GENEVAL_TAGS, held_out_keys
from nextstep.training.data.shapes.relations import POSITION_THRESHOLD, box_relations, centres_satisfy
from nextstep.training.data.shapes.render import render_scene
from nextstep.training.data.shapes.world import (
    RELATION_SLACK,
    boxes_overlap,
    count_phrase,
    free_spot,
    object_phrase,
    sample_scene,
    shape_phrase,
)

# The shapes world.


def test_held_out_combinations_are_the_same_in_every_version():
    """The held-out keys are fixed, so evaluations of different runs and releases stay comparable."""
    held = {tag: sorted(held_out_keys(tag), key=repr) for tag in GENEVAL_TAGS}
    assert held["single_object"] == []
    assert held["two_object"] == [("circle", "triangle"), ("square", "circle"), ("triangle", "square")]
    assert held["counting"] == [(2, "circle"), (3, "square"), (4, "triangle")]
    assert held["colors"] == [
        ("blue", "triangle"),
        ("green", "square"),
        ("orange", "triangle"),
        ("purple", "square"),
        ("red", "circle"),
        ("yellow", "circle"),
    ]
    assert held["position"] == [
        ("circle", "left of", "square"),
        ("circle", "right of", "triangle"),
        ("square", "above", "circle"),
        ("square", "below", "triangle"),
        ("triangle", "left of", "circle"),
        ("triangle", "right of", "square"),
    ]
    digest = hashlib.sha256(repr(held["color_attr"]).encode()).hexdigest()[:16]
    assert len(held["color_attr"]) == 45 and digest == "a0b052eb057a8945"


def test_position_captions_state_a_relation_clear_by_the_caption_margin_and_the_box_slack():
    """A position caption's relation holds with the 0.1 centre margin and GenEval's box rule plus slack."""
    dataset = ShapesDataset(ShapesConfig(num_samples=300, kinds=("position", "colour_position")))
    for index in range(300):
        scene = dataset.scene(index)
        rel = scene.relation
        subject, reference = scene.objects[rel.subject], scene.objects[rel.reference]
        assert centres_satisfy(rel.relation, subject.center, reference.center, margin=0.1), scene
        assert rel.relation in box_relations(
            subject.drawn_box(), reference.drawn_box(), POSITION_THRESHOLD + RELATION_SLACK
        ), scene


def test_a_diagonal_offset_names_neither_axis_relation():
    """A centre offset equally far along both axes is neither 'below' nor 'right of' by the axis rule."""
    for relation in ("below", "right of"):
        assert not centres_satisfy(relation, (0.6, 0.6), (0.5, 0.5))
    assert centres_satisfy("below", (0.6, 0.65), (0.5, 0.5))


def test_words_starting_with_a_vowel_take_an():
    """Phrases of an orange object say 'an orange', and counts have no article."""
    assert shape_phrase("circle", "orange") == "an orange circle"
    assert object_phrase(ShapeObject("square", "orange", (0.5, 0.5), 0.3)) == "an orange square"
    assert shape_phrase("triangle", "red") == "a red triangle"
    assert count_phrase(3, "triangle", "orange") == "three orange triangles"


def test_boxes_closer_than_the_margin_overlap_along_either_axis():
    """`boxes_overlap` widens the other boxes by the margin vertically as well as horizontally."""
    box = (0.0, 0.0, 0.1, 0.1)
    below, beside = (0.0, 0.12, 0.1, 0.2), (0.12, 0.0, 0.2, 0.1)
    for other in (below, beside):
        assert boxes_overlap(box, [other], margin=0.03)
        assert not boxes_overlap(box, [other], margin=0.01)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**16))
def test_a_free_spot_keeps_clear_of_every_object(seed):
    """The spot `free_spot` finds for a new object stays the margin away from the existing ones."""
    objects = [ShapeObject("square", "red", (0.5, 0.5), 0.5), ShapeObject("circle", "blue", (0.2, 0.2), 0.2)]
    spot = free_spot(random.Random(seed), objects, 0.2)
    if spot is not None:
        half = 0.1
        boxes = [
            (o.center[0] - o.size / 2, o.center[1] - o.size / 2, o.center[0] + o.size / 2, o.center[1] + o.size / 2)
            for o in objects
        ]
        assert not boxes_overlap((spot[0] - half, spot[1] - half, spot[0] + half, spot[1] + half), boxes, 0.03)


def test_counting_reaches_six_when_asked():
    """With ``max_count=6`` counting scenes hold every count from two to six."""
    dataset = ShapesDataset(ShapesConfig(num_samples=150, kinds=("counting",), max_count=6))
    assert {len(dataset.scene(i).objects) for i in range(150)} == {2, 3, 4, 5, 6}


def test_every_scene_kind_is_drawn_and_keeps_clear_of_the_border():
    """The default dataset mixes all eight kinds, and every object stays 0.02 inside the image."""
    from nextstep.training.data.shapes import SCENE_KINDS

    dataset = ShapesDataset(ShapesConfig(num_samples=300))
    scenes = [dataset.scene(i) for i in range(300)]
    assert {scene.kind for scene in scenes} == set(SCENE_KINDS)
    for scene in scenes:
        for obj in scene.objects:
            left, top, right, bottom = obj.bbox(1, 1)
            assert min(left, top) >= 0.02 - 1e-9 and max(right, bottom) <= 0.98 + 1e-9, scene


def test_a_count_of_six_is_a_true_caption_of_six_objects():
    """`true_captions` states large counts as they are, with the shared colour or without."""
    from nextstep.training.data.shapes.captions import true_captions

    objects = tuple(ShapeObject("circle", "red", (0.1 + 0.15 * i, 0.5), 0.1) for i in range(6))
    captions = true_captions(Scene(objects, "six circles", "counting"))
    assert {"six circles", "six red circles"} <= captions
    assert not {"four circles", "four red circles"} & captions


def test_the_seed_changes_the_scenes():
    """Two seeds of one split draw different scenes."""
    first = ShapesDataset(ShapesConfig(num_samples=20, seed=0))
    second = ShapesDataset(ShapesConfig(num_samples=20, seed=1))
    assert [first.scene(i) for i in range(20)] != [second.scene(i) for i in range(20)]


def test_a_scene_index_outside_the_dataset_is_refused():
    """Index ``len`` and negative indices raise IndexError."""
    dataset = ShapesDataset(ShapesConfig(num_samples=5))
    for index in (5, -1):
        with pytest.raises(IndexError, match=r"index must be in \[0, 5\)"):
            dataset.scene(index)


@pytest.mark.parametrize("max_count", [1, 7])
def test_a_count_without_a_number_word_is_refused(max_count):
    """``max_count`` must lie in [2, 6], the counts the captions have words for."""
    with pytest.raises(ValueError, match="max_count"):
        ShapesConfig(max_count=max_count)


def test_a_kind_without_held_out_combinations_is_refused_at_once():
    """Asking for held-out single objects names the kind instead of drawing in vain."""
    with pytest.raises(ValueError, match="scene kind 'single_object' has no held-out combinations"):
        sample_scene(random.Random(0), "single_object", combinations="held_out")
    with pytest.raises(ValueError, match="kinds"):
        ShapesConfig(kinds=("single_object",), combinations="held_out")


def test_a_wide_image_sizes_objects_by_its_shorter_side_and_places_them_by_fractions():
    """On a 200 x 100 image a square of size 0.5 at (0.25, 0.5) spans 50 pixels around (50, 50)."""
    square = ShapeObject("square", "red", (0.25, 0.5), 0.5)
    assert square.bbox(200, 100) == (25.0, 25.0, 75.0, 75.0)
    image = render_scene(Scene((square,), "a red square", "colors"), 200, 100)
    assert image.size == (200, 100)
    assert image.getpixel((50, 50)) == COLOURS["red"] and image.getpixel((30, 70)) == COLOURS["red"]
    assert image.getpixel((100, 50)) == (255, 255, 255) and image.getpixel((50, 90)) == (255, 255, 255)


@pytest.mark.parametrize("width, height", [(0, 10), (10, 0)])
def test_an_empty_image_size_is_refused(width, height):
    """Either side below one pixel raises ValueError."""
    scene = Scene((ShapeObject("circle", "red", (0.5, 0.5), 0.5),), "a red circle", "colors")
    with pytest.raises(ValueError, match="image size must be positive"):
        render_scene(scene, width, height)


def test_invalid_scene_parts_are_refused():
    """A zero size and a relation naming a missing object raise ValueError."""
    with pytest.raises(ValueError, match="size must be in"):
        ShapeObject("circle", "red", (0.5, 0.5), 0.0)
    objects = (ShapeObject("circle", "red", (0.2, 0.5), 0.2), ShapeObject("square", "blue", (0.8, 0.5), 0.2))
    with pytest.raises(ValueError, match="relation refers to object 2"):
        Scene(objects, "a circle to the left of a square", "position", Relation(0, "left of", 2))


def test_a_scene_background_survives_the_round_trip():
    """`Scene.to_dict` / `from_dict` and the JSON form keep a non-white background."""
    scene = Scene((ShapeObject("circle", "red", (0.5, 0.5), 0.5),), "a red circle", "colors", background=(10, 20, 30))
    assert Scene.from_dict(scene.to_dict()).background == (10, 20, 30)
    assert Scene.from_json(scene.to_json()) == scene


def test_train_and_test_samples_have_distinct_keys_and_a_minimum_size():
    """Sample keys name the split, and images below 8 pixels are refused."""
    train = ShapesDataset(ShapesConfig(num_samples=2, size=16)).load(1)
    test = ShapesDataset(ShapesConfig(num_samples=2, size=16, split="test")).load(1)
    assert (train.key, test.key) == ("shapes/train/1", "shapes/test/1")
    with pytest.raises(ValueError, match="size"):
        ShapesConfig(size=7)


def test_the_grammar_never_counts_one_object_in_the_plural():
    """Count captions start at two; 'one circles' is not a caption of the grammar."""
    captions = grammar_captions()
    assert "two red circles" in captions and "six squares" in captions
    assert not [c for c in captions if c.startswith("one ")]


# Mixtures, bad samples, the loader and the registry.


class _Named(ImageTextDataset):
    """``count`` samples named ``<letter><index>``, some of them already known to be bad."""

    def __init__(self, letter, count, known_bad=()):
        self.letter, self.count, self.known_bad = letter, count, list(known_bad)

    def __len__(self):
        return self.count

    def load(self, index):
        return ImageTextSample(key=f"{self.letter}{index}", caption=f"{self.letter}{index}")

    def image_size(self, index):
        return (16, 16)

    def describe(self):
        return self.letter


def test_a_mixture_refuses_bad_repeats():
    """Repeats must be one integer >= 1 per dataset."""
    from nextstep.training.data.mixture import ConcatImageTextDataset

    for repeats in ([0, 1], [1], [1, 1, 1]):
        with pytest.raises(ValueError, match="repeats must be one integer >= 1 per dataset"):
            ConcatImageTextDataset([_Named("a", 2), _Named("b", 3)], repeats=repeats)


def test_a_mixture_gathers_the_known_bad_samples_of_all_its_datasets_and_names_its_repeats():
    """Known-bad keys of every dataset count, and `describe` marks repeated datasets only."""
    from nextstep.training.data.mixture import ConcatImageTextDataset

    mixture = ConcatImageTextDataset([_Named("a", 2, ["a9"]), _Named("b", 3, ["b7", "b8"])], repeats=[2, 1])
    assert sorted(mixture.known_bad) == ["a9", "b7", "b8"]
    assert mixture.describe() == "a x2 + b"


def test_a_bad_share_exactly_at_the_limit_of_a_stream_is_tolerated():
    """Without a dataset size, 2 bad of 200 reads is exactly 1 % and passes; one more bad stops the run."""
    from nextstep.training.data.quality import BadSampleTracker

    tracker = BadSampleTracker(0.01)
    tracker.update(200, ["a", "b"])
    with pytest.raises(DataQualityError, match="3 unreadable samples of the 200 samples read"):
        tracker.update(0, ["c"])


def test_samples_examined_before_training_count_towards_the_read_rate():
    """``initial_total`` reads join the base of a stream's bad-sample share."""
    from nextstep.training.data.quality import BadSampleTracker

    tracker = BadSampleTracker(0.01, initial_bad=["a"], initial_total=150)
    tracker.update(50, ["b"])
    tracker.update(60, [])
    assert tracker.reads == 260 and tracker.num_bad == 2


def test_each_bad_sample_is_warned_about_once(caplog):
    """A sample that fails again is neither warned about nor counted twice."""
    import logging

    from nextstep.training.data.quality import BadSampleTracker

    tracker = BadSampleTracker(0.5, dataset_size=100)
    with caplog.at_level(logging.WARNING, logger="nextstep.training"):
        tracker.update(4, ["x (truncated)"])
        tracker.update(4, ["x (truncated)"])
    assert tracker.num_bad == 1
    assert caplog.text.count("skipped unreadable sample x (truncated)") == 1


def test_a_resumed_tracker_continues_from_its_saved_counts():
    """`state_dict` / `load_state_dict` keep the bad keys and reads, so a resumed run stops where it would have."""
    from nextstep.training.data.quality import BadSampleTracker

    tracker = BadSampleTracker(0.01)
    tracker.update(300, ["a", "b"])
    resumed = BadSampleTracker(0.01)
    resumed.load_state_dict(tracker.state_dict())
    assert resumed.num_bad == 2 and resumed.reads == 300
    resumed.update(0, ["a"])  # seen before: not a new one
    with pytest.raises(DataQualityError, match="4 unreadable samples of the 300 samples read"):
        resumed.update(0, ["c", "d"])


def test_the_batches_of_an_epoch_mix_their_buckets():
    """An epoch's batches are shuffled across buckets, not taken one bucket after another."""
    from nextstep.training.data.loader import BatchPlan

    plan = BatchPlan(["a"] * 80 + ["b"] * 80, 4, seed=0)
    buckets = [plan.groups[batch[0]] for batch in plan.epoch_batches(0)]
    assert sorted(buckets) == ["a"] * 20 + ["b"] * 20
    changes = sum(first != second for first, second in zip(buckets, buckets[1:]))
    assert changes > 5


def test_steps_after_the_first_epoch_use_their_own_epochs_order():
    """Step ``batches_per_epoch + k`` is batch ``k`` of epoch 1, not of epoch 0 again."""
    from nextstep.training.data.loader import BatchPlan

    plan = BatchPlan([(32, 32)] * 64, 4, seed=0)
    first = [plan.global_batch(k) for k in range(16)]
    second = [plan.global_batch(16 + k) for k in range(16)]
    assert second == [list(b) for b in plan.epoch_batches(1)]
    assert first != second and plan.epoch_of(16) == 1


def test_cached_samples_of_different_token_grids_are_not_collated():
    """A batch of cached tokens must share one grid."""
    from nextstep.training.data.loader import collate_samples

    samples = [
        ImageTextSample(key="a", caption="a", tokens=torch.zeros(4, 2), grid=(2, 2)),
        ImageTextSample(key="b", caption="b", tokens=torch.zeros(4, 2), grid=(1, 4)),
    ]
    with pytest.raises(ValueError, match="must share a token grid"):
        collate_samples(samples, 16, 16)


def test_the_seed_changes_the_batch_order():
    """Two seeds give two different orders of the same samples."""
    from nextstep.training.data.loader import BatchPlan

    first, second = BatchPlan([(32, 32)] * 64, 4, seed=0), BatchPlan([(32, 32)] * 64, 4, seed=1)
    assert first.epoch_batches(0) != second.epoch_batches(0)
    assert sorted(sum(first.epoch_batches(0), [])) == sorted(sum(second.epoch_batches(0), [])) == list(range(64))


def test_a_run_of_unreadable_samples_is_skipped_by_default():
    """Eight unreadable samples in a row are replaced by the next readable one of the bucket."""
    from nextstep.training.data.base import CorruptSampleError
    from nextstep.training.data.loader import BatchAssembler

    class Broken(_Named):
        def load(self, index):
            if 1 <= index <= 8:
                raise CorruptSampleError(f"s{index}", "truncated")
            sample = super().load(index)
            sample.image = Image.new("RGB", (16, 16))
            return sample

    batch = BatchAssembler(Broken("s", 12), ["square"] * 12)[([1], (16, 16))]
    assert batch.keys == ["s9"] and len(batch.bad_keys) == 8 and batch.attempted == 9


def test_an_empty_dataset_is_named_before_batching():
    """Training batches of an empty dataset raise ValueError saying it is empty."""
    from nextstep.training.data.buckets import AspectRatioBuckets
    from nextstep.training.data.loader import BatchLayout, TrainingBatches

    with pytest.raises(ValueError, match="is empty: nothing to train on"):
        TrainingBatches(_Named("e", 0), AspectRatioBuckets(32, multi_aspect=False), BatchLayout(2))


def test_the_dataset_registry_guards_its_names():
    """Names are sorted, taken names and classes without a config are refused, a spec needs a type."""
    from nextstep.training.data.registry import dataset_config, dataset_names, register_dataset

    names = dataset_names()
    assert names == sorted(names) and {"shapes", "emoji", "fashion_mnist"} <= set(names)

    class Impostor:
        config_class = ShapesConfig

    with pytest.raises(ValueError, match="dataset 'shapes' is already registered to ShapesDataset"):
        register_dataset("shapes")(Impostor)

    class Bare:
        pass

    with pytest.raises(TypeError, match="Bare needs a 'config_class' attribute"):
        register_dataset("bare_without_config")(Bare)
    with pytest.raises(ValueError, match=r"unknown dataset type 'shapez'; known: \[.*'shapes'"):
        dataset_config({"type": "shapez"})
    with pytest.raises(ValueError, match="mapping with a 'type' key"):
        dataset_config({"num_samples": 3})
    cls, config = dataset_config({"type": "shapes", "num_samples": 3})
    assert cls is ShapesDataset and config.num_samples == 3


# Emoji and Fashion-MNIST.


def test_the_base_emoji_drops_the_variation_selector_and_every_skin_tone():
    """All five tone modifiers (U+1F3FB..U+1F3FF) and U+FE0F are stripped."""
    from nextstep.training.data.emoji import base_emoji

    assert base_emoji("\u263a\ufe0f") == "\u263a"
    for tone in range(0x1F3FB, 0x1F400):
        assert base_emoji("\U0001f44b" + chr(tone)) == "\U0001f44b"


def test_the_split_seed_moves_emoji_between_train_and_test():
    """Another ``split_seed`` gives another split of the same base emoji."""
    from nextstep.training.data.emoji import split_of

    bases = [f"x{i}" for i in range(200)]
    assert [split_of(b, 0.3, seed=0) for b in bases] != [split_of(b, 0.3, seed=1) for b in bases]
    assert [split_of(b, 0.3, seed=0) for b in bases] == [split_of(b, 0.3) for b in bases]


def test_an_emoji_test_fraction_of_one_is_refused():
    """``test_fraction`` must lie in [0, 1): a test split of everything leaves no training data."""
    from nextstep.training.data.emoji import EmojiConfig

    with pytest.raises(ValueError, match="test_fraction"):
        EmojiConfig(test_fraction=1.0)


def test_the_emoji_list_keeps_fully_qualified_emoji_named_after_their_version_tag(tmp_path):
    """Unqualified forms are left out; an emoji the names package lacks takes the name after 'E<version>'."""
    pytest.importorskip("emoji")
    from nextstep.training.data.emoji import read_emoji_list

    path = tmp_path / "emoji-test.txt"
    path.write_text(
        "# group: Made Up\n# subgroup: made-up\n"
        "E000 ; fully-qualified # \ue000 E99.0 made up thing\n"
        "263A FE0F ; fully-qualified # \u263a\ufe0f E0.6 smiling face\n"
        "263A ; unqualified # \u263a E0.6 smiling face\n",
        encoding="utf-8",
    )
    entries = read_emoji_list(path)
    assert [e.text for e in entries] == ["\ue000", "\u263a\ufe0f"]
    assert entries[0].name == "made up thing" and entries[0].group == "Made Up"


def test_an_emoji_background_must_be_an_rgb_triple():
    """A four-value background is refused."""
    from nextstep.training.data.emoji import EmojiConfig

    with pytest.raises(ValueError, match="background"):
        EmojiConfig(background=(1, 2, 3, 4))


@needs_emoji
def test_an_unknown_emoji_group_is_named_with_the_known_ones():
    """A misspelt group raises ValueError listing the real groups."""
    from nextstep.training.data.emoji import EmojiConfig, EmojiDataset

    with pytest.raises(ValueError, match=r"unknown emoji groups \['Flagz'\]; known: .*'Flags'"):
        EmojiDataset(EmojiConfig(split="all", groups=("Flagz",)))


@needs_emoji
def test_a_wide_glyph_is_drawn_whole_and_centred():
    """A flag (wider than tall) keeps a background border on all four sides."""
    from nextstep.training.data.emoji import EmojiConfig, EmojiDataset

    flags = EmojiDataset(EmojiConfig(split="all", size=128, background=(0, 0, 0), groups=("Flags",)))
    index = next(i for i, e in enumerate(flags.entries) if e.name == "flag of France")
    sample = flags.load(index)
    assert sample.caption == flags.caption(index) == "flag of France"
    pixels = np.asarray(sample.image).astype(int)
    for border in (pixels[:, 0], pixels[:, -1], pixels[0], pixels[-1]):
        assert border.max() < 16
    assert pixels[64, 20].min() > 200 or pixels[64, 64].min() > 200  # the white middle stripe


@needs_fashion_mnist
def test_fashion_mnist_labels_are_named_in_the_official_order():
    """The first training images are an ankle boot, a t-shirt and a dress, as the dataset labels them."""
    dataset = fashion_mnist.FashionMNISTDataset(fashion_mnist.FashionMNISTConfig(limit=4))
    assert [dataset.load(i).metadata["class"] for i in (0, 1, 3)] == ["ankle boot", "t-shirt", "dress"]
    assert dataset.caption(0).endswith("an ankle boot")


@needs_fashion_mnist
def test_fashion_mnist_pixels_are_the_files_grey_levels_at_any_size():
    """At 28 pixels an image is the raw grey array (black background); other sizes are resized."""
    dataset = fashion_mnist.FashionMNISTDataset(fashion_mnist.FashionMNISTConfig(limit=3, size=28))
    image = dataset.load(0).image
    assert image.getpixel((0, 0)) == (0, 0, 0)
    np.testing.assert_array_equal(np.asarray(image)[..., 0], dataset.images[0])
    large = fashion_mnist.FashionMNISTDataset(fashion_mnist.FashionMNISTConfig(limit=3, size=64))
    assert large.load(0).image.size == (64, 64)


@needs_fashion_mnist
def test_fashion_mnist_captions_use_every_template():
    """Each sample's template is fixed by its index and all templates occur."""
    config = fashion_mnist.FashionMNISTConfig(limit=40, templates=("first {name}", "second {name}"))
    dataset = fashion_mnist.FashionMNISTDataset(config)
    captions = [dataset.caption(i) for i in range(40)]
    assert {c.split()[0] for c in captions} == {"first", "second"}
    assert captions == [dataset.caption(i) for i in range(40)]


def test_fashion_mnist_config_refuses_a_negative_limit_and_a_template_without_a_name():
    """``limit`` must be >= 0 and each template needs a ``{name}`` slot."""
    with pytest.raises(ValueError, match="limit"):
        fashion_mnist.FashionMNISTConfig(limit=-1)
    with pytest.raises(ValueError, match="templates"):
        fashion_mnist.FashionMNISTConfig(templates=("a photo",))


def test_a_file_that_is_not_an_idx_images_file_is_refused(tmp_path):
    """An images file with a labels magic number raises ValueError naming the expected magic."""
    images, labels = fashion_mnist._FILES["test"]
    header = (0x801).to_bytes(4, "big") + bytes(12)
    with gzip.open(tmp_path / images, "wb") as handle:
        handle.write(header + bytes(28 * 28))
    with gzip.open(tmp_path / labels, "wb") as handle:
        handle.write((0x801).to_bytes(4, "big") + bytes(4) + bytes(1))
    with pytest.raises(ValueError, match=r"is not an IDX images file \(magic 0x801, expected 0x803\)"):
        fashion_mnist.load_arrays("test", tmp_path)


# Layers and training times.


def test_rotary_frequencies_stay_fp32_after_a_dtype_cast():
    """Casting the module to bf16 keeps exact fp32 frequencies, so angles do not drift."""
    from nextstep.layers import RotaryEmbedding

    fresh = RotaryEmbedding(64)
    cast = RotaryEmbedding(64).to(torch.bfloat16)
    assert cast.inv_freq.dtype == torch.float32 and cast.signed_frequencies.dtype == torch.float32
    torch.testing.assert_close(cast.inv_freq, fresh.inv_freq, rtol=0, atol=0)
    positions = torch.tensor([[0, 1000, 4000]])
    torch.testing.assert_close(cast(positions, torch.float32), fresh(positions, torch.float32), rtol=0, atol=0)


def test_rotary_refuses_an_odd_head_dim():
    """The rotate-half layout needs an even head dimension."""
    from nextstep.layers import RotaryEmbedding

    with pytest.raises(ValueError, match="head_dim must be even"):
        RotaryEmbedding(7)


def test_rotary_tables_come_in_the_dtype_asked_for():
    """Both table forms are returned in bf16 when bf16 is asked for, computed from fp32 angles."""
    from nextstep.layers import RotaryEmbedding

    rotary = RotaryEmbedding(8)
    positions = torch.arange(5)[None]
    cos, signed_sin = rotary.signed_tables(positions, torch.bfloat16)
    assert cos.dtype == signed_sin.dtype == torch.bfloat16
    full_cos, full_sin = rotary.signed_tables(positions, torch.float32)
    torch.testing.assert_close(cos, full_cos.to(torch.bfloat16))
    assert all(t.dtype == torch.bfloat16 for t in rotary(positions, torch.bfloat16))


def test_rms_norm_defaults_to_an_epsilon_of_one_in_a_million():
    """RMSNorm's default eps is Qwen2's 1e-6, which shows on inputs of tiny magnitude."""
    from nextstep.layers import RMSNorm

    norm = RMSNorm(4)
    assert norm.eps == 1e-6
    x = torch.full((1, 4), 1e-3)
    torch.testing.assert_close(norm(x), x / torch.sqrt(torch.tensor(1e-6 + 1e-6)))


def test_an_adaln_block_widens_its_mlp_by_the_ratio():
    """``mlp_ratio`` sets the hidden width of the block's MLP."""
    from nextstep.layers import AdaLNResBlock

    block = AdaLNResBlock(8, mlp_ratio=2.5)
    assert block.mlp[0].out_features == 20 and block.mlp[2].in_features == 20


def test_training_times_default_to_the_logit_normal():
    """Without a method, times are sigmoid(N(0, 1)): their logits have unit spread, unlike uniform times."""
    from nextstep.heads.time_sampling import sample_times

    t = sample_times(20_000, generator=torch.Generator().manual_seed(0))
    logits = torch.logit(t.double())
    assert abs(float(logits.mean())) < 0.05 and abs(float(logits.std()) - 1.0) < 0.05
    uniform = sample_times(20_000, "uniform", generator=torch.Generator().manual_seed(0))
    assert float(torch.logit(uniform.double()).std()) > 1.5
