"""Image folders with sidecar captions or a JSONL manifest; broken files are skipped, counted, bounded."""

import json
import logging

import pytest
from PIL import Image

from nextstep.training.data import (
    AspectRatioBuckets,
    BatchLayout,
    DataQualityError,
    ImageFolderConfig,
    ImageFolderDataset,
    TrainingBatches,
)
from nextstep.training.data.quality import BadSampleTracker


def _write_images(folder, count, size=(40, 24), captions=True):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", size, (i * 7 % 256, 100, 50)).save(folder / f"img{i:03d}.png")
        if captions:
            (folder / f"img{i:03d}.txt").write_text(f"picture number {i}\n")


def test_sidecar_captions_and_sizes(tmp_path):
    _write_images(tmp_path, 3)
    dataset = ImageFolderDataset(ImageFolderConfig(path=str(tmp_path)))
    assert len(dataset) == 3
    sample = dataset.load(1)
    assert sample.caption == "picture number 1" and sample.image.size == (40, 24)
    assert dataset.image_size(2) == (40, 24)


def test_manifest_layout(tmp_path):
    _write_images(tmp_path / "images", 2, captions=False)
    lines = [json.dumps({"image": f"images/img{i:03d}.png", "caption": f" caption {i}\n"}) for i in range(2)]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    dataset = ImageFolderDataset(ImageFolderConfig(path=str(tmp_path / "train.jsonl")))
    assert [dataset.load(i).caption for i in range(2)] == ["caption 0", "caption 1"]


def test_missing_caption_names_the_file(tmp_path):
    _write_images(tmp_path, 2)
    (tmp_path / "img001.txt").unlink()
    with pytest.raises(ValueError, match=r"img001\.png has no caption.*img001\.txt"):
        ImageFolderDataset(ImageFolderConfig(path=str(tmp_path)))
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "img000.png"}) + "\n")
    with pytest.raises(ValueError, match=r"line 1: image .*img000\.png has no caption"):
        ImageFolderDataset(ImageFolderConfig(path=str(tmp_path / "m.jsonl")))


def _batches(dataset, max_bad_fraction=0.01, steps=30):
    tracker = BadSampleTracker(max_bad_fraction, dataset.scanned, dataset.known_bad)
    loader = TrainingBatches(dataset, AspectRatioBuckets(32, multi_aspect=False), BatchLayout(4))
    for _, batch in zip(range(steps), loader):
        tracker.update(batch.attempted, batch.bad_keys)
        assert batch.images.shape == (4, 3, 32, 32)
    return tracker


def test_one_broken_file_in_two_hundred_is_skipped_with_a_warning(tmp_path, caplog):
    _write_images(tmp_path, 200)
    data = (tmp_path / "img005.png").read_bytes()
    (tmp_path / "img005.png").write_bytes(data[: len(data) // 2])  # header fine, pixels truncated
    dataset = ImageFolderDataset(ImageFolderConfig(path=str(tmp_path)))
    assert len(dataset) == 200
    with caplog.at_level(logging.WARNING, logger="nextstep.training"):
        tracker = _batches(dataset, steps=50)  # one epoch reads every file
    assert tracker.num_bad == 1
    assert "img005.png" in caplog.text


def test_more_than_one_percent_broken_stops_the_run(tmp_path):
    _write_images(tmp_path, 100)
    for i in (3, 40):
        (tmp_path / f"img{i:03d}.png").write_bytes(b"not an image")
    with pytest.raises(DataQualityError, match=r"2 unreadable samples of the 100 samples.*img003"):
        # Broken headers are found while scanning, before any training.
        dataset = ImageFolderDataset(ImageFolderConfig(path=str(tmp_path)))
        BadSampleTracker(0.01, dataset.scanned, dataset.known_bad)


def test_all_files_broken_never_trains_on_nothing(tmp_path):
    _write_images(tmp_path, 10)
    for i in range(10):
        path = tmp_path / f"img{i:03d}.png"
        path.write_bytes(path.read_bytes()[:60])
    dataset = ImageFolderDataset(ImageFolderConfig(path=str(tmp_path)))
    with pytest.raises(DataQualityError):
        _batches(dataset, max_bad_fraction=0.5)


def test_tracker_without_a_known_size_uses_the_read_rate():
    tracker = BadSampleTracker(0.01)
    tracker.update(50, ["a"])  # too few reads to judge
    tracker.update(150, [])
    tracker.update(1, ["b"])  # 2 of 201: still under 1 %
    with pytest.raises(DataQualityError, match="3 unreadable samples of the 202 samples read"):
        tracker.update(1, ["c"])


def test_photos_stand_as_their_exif_orientation_says_and_wide_modes_keep_their_levels(tmp_path):
    import numpy as np

    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown turned a quarter: portrait
    Image.new("RGB", (64, 32), "red").save(tmp_path / "phone.jpg", exif=exif.tobytes())
    (tmp_path / "phone.txt").write_text("\ufeffa phone photo\n", encoding="utf-8")  # with a byte-order mark
    Image.fromarray(np.full((16, 16), 32768, dtype=np.uint16)).save(tmp_path / "grey16.png")
    (tmp_path / "grey16.txt").write_text("mid grey")
    dataset = ImageFolderDataset(ImageFolderConfig(path=str(tmp_path)))
    by_caption = {dataset.load(i).caption: i for i in range(len(dataset))}
    phone = by_caption["a phone photo"]
    assert dataset.image_size(phone) == (32, 64) and dataset.load(phone).image.size == (32, 64)
    assert dataset.load(by_caption["mid grey"]).image.getpixel((0, 0)) == (128, 128, 128)
    # Transparent pixels of palette and premultiplied modes lie on white, as those of RGBA do.
    from nextstep.images import to_rgb

    transparent = Image.new("PA", (4, 4))
    transparent.putpalette([0, 0, 0] * 256)
    for image in (transparent, Image.new("La", (4, 4)), Image.new("RGBa", (4, 4))):
        assert to_rgb(image).getpixel((0, 0)) == (255, 255, 255), image.mode
    # So do the key-coloured pixels of RGB and grey PNGs, and a PNG's EXIF orientation counts when bucketing.
    keyed = tmp_path / "keyed"
    keyed.mkdir()
    Image.new("RGB", (4, 4)).save(keyed / "rgb.png", transparency=(0, 0, 0))
    Image.new("L", (4, 4)).save(keyed / "grey.png", transparency=0)
    for name in ("rgb.png", "grey.png"):
        with Image.open(keyed / name) as image:
            assert to_rgb(image).getpixel((0, 0)) == (255, 255, 255), name
    turned = tmp_path / "turned"
    turned.mkdir()
    Image.new("RGB", (64, 32), "blue").save(turned / "drawing.png", exif=exif.tobytes())
    (turned / "drawing.txt").write_text("a turned drawing")
    dataset = ImageFolderDataset(ImageFolderConfig(path=str(turned)))
    assert dataset.image_size(0) == (32, 64) and dataset.load(0).image.size == (32, 64)


def test_the_content_fingerprint_follows_pixels_and_captions(tmp_path):
    _write_images(tmp_path, 2)
    before = ImageFolderDataset(ImageFolderConfig(path=str(tmp_path))).content_fingerprint()
    assert ImageFolderDataset(ImageFolderConfig(path=str(tmp_path))).content_fingerprint() == before
    (tmp_path / "img001.txt").write_text("another caption")
    assert ImageFolderDataset(ImageFolderConfig(path=str(tmp_path))).content_fingerprint() != before


def test_a_turned_tiff_is_bucketed_as_it_is_shown(tmp_path):
    """Pillow may report a TIFF's size with its orientation applied already: it is not swapped twice."""
    (tmp_path / "scan.txt").write_text("a turned scan")
    Image.new("RGB", (64, 16), "red").save(tmp_path / "scan.tif", tiffinfo={0x0112: 6})  # shown 16 wide, 64 tall
    dataset = ImageFolderDataset(ImageFolderConfig(path=str(tmp_path), extensions=(".tif",)))
    assert dataset.load(0).image.size == (16, 64)
    assert dataset.image_size(0) == (16, 64)


def test_a_manifest_may_name_files_elsewhere_and_its_bad_fields_are_named(tmp_path):
    _write_images(tmp_path / "elsewhere", 1, captions=False)
    elsewhere = str(tmp_path / "elsewhere" / "img000.png")
    (tmp_path / "data").mkdir()
    manifest = tmp_path / "data" / "m.jsonl"
    manifest.write_text(json.dumps({"image": elsewhere, "caption": "far", "width": 40, "height": 24}) + "\n")
    dataset = ImageFolderDataset(ImageFolderConfig(path=str(manifest)))
    assert dataset.load(0).image.size == (40, 24) and dataset.image_size(0) == (40, 24)
    assert len(dataset.content_fingerprint()) == 16  # what a latent cache of it is keyed by
    for entry, expected in (
        ({"image": 5, "caption": "x"}, r"line 1: expected an object with an 'image' path \(a non-empty string\)"),
        ({"image": None, "caption": "x"}, r"'image' path"),
        ({"image": elsewhere, "caption": "x", "width": "wide", "height": 3},
         r"line 1: 'width' and 'height' must be given together as positive integers \(pixels\), "
         r"found width='wide', height=3"),
        ({"image": elsewhere, "caption": "x", "width": 0, "height": 32}, r"found width=0, height=32"),
        ({"image": elsewhere, "caption": "x", "width": 32}, r"found width=32, height=None"),
    ):
        manifest.write_text(json.dumps(entry) + "\n")
        with pytest.raises(ValueError, match=expected):
            ImageFolderDataset(ImageFolderConfig(path=str(manifest)))


def test_captions_are_read_without_opening_the_images_so_a_broken_one_keeps_its_caption(tmp_path):
    _write_images(tmp_path, 3)
    data = (tmp_path / "img001.png").read_bytes()
    (tmp_path / "img001.png").write_bytes(data[: len(data) // 2])  # the header reads, the pixels do not
    dataset = ImageFolderDataset(ImageFolderConfig(path=str(tmp_path)))
    assert [dataset.caption(index) for index in range(3)] == [f"picture number {i}" for i in range(3)]


def test_a_word_tokenizer_is_fitted_to_the_captions_of_the_samples_that_can_be_read(tmp_path):
    from types import SimpleNamespace

    from nextstep.training.data import CorruptSampleError, ImageTextDataset
    from nextstep.training.recipe import RecipeConfig, recipe_text_tokenizer

    class CaptionsThroughImages(ImageTextDataset):  # the default caption: read through the sample
        def __len__(self):
            return 3

        def image_size(self, index):
            return (8, 8)

        def load(self, index):
            if index == 1:
                raise CorruptSampleError("sample-1", "broken")
            return SimpleNamespace(caption=["red apple", "", "blue apple"][index])

    data = SimpleNamespace(streaming=False, dataset=CaptionsThroughImages())
    tokenizer = recipe_text_tokenizer(RecipeConfig(text_tokenizer={"type": "word", "min_count": 1}), data)
    assert {"red", "blue", "apple"} <= {word.strip() for word in tokenizer.words}


def test_a_bad_share_exactly_at_the_limit_is_tolerated_and_one_more_stops_the_run():
    tracker = BadSampleTracker(0.01, dataset_size=200, initial_bad=["img001.png (truncated)"])
    tracker.update(4, ["img002.png (truncated)"])  # 2 of 200: exactly 1 %
    tracker.update(4, ["img001.png (truncated)"])  # the same sample again is not a new one
    assert tracker.num_bad == 2
    with pytest.raises(DataQualityError, match="3 unreadable samples of the 200 samples"):
        tracker.update(4, ["img003.png (truncated)"])


def test_the_training_data_size_counts_the_files_whose_header_could_not_be_read(tmp_path):
    from nextstep.training.data import TrainingData

    _write_images(tmp_path, 10)
    (tmp_path / "img004.png").write_bytes(b"not an image")
    dataset = ImageFolderDataset(ImageFolderConfig(path=str(tmp_path)))
    assert len(dataset) == 9
    data = TrainingData(dataset, AspectRatioBuckets(32, multi_aspect=False))
    assert data.size == 10 and len(data.known_bad) == 1


def test_sidecar_images_are_found_in_subfolders_and_listed_in_path_order(tmp_path):
    """The sidecar layout is searched recursively; samples are ordered by path (``a/`` before ``b/``, files of
    the root folder by name)."""
    for folder, count in (("b", 2), ("a/deeper", 1), (".", 1)):
        _write_images(tmp_path / folder, count)
    dataset = ImageFolderDataset(ImageFolderConfig(path=str(tmp_path)))
    names = [str(path.relative_to(tmp_path)) for path in dataset.paths]
    assert names == ["a/deeper/img000.png", "b/img000.png", "b/img001.png", "img000.png"]
    assert [dataset.caption(index) for index in range(4)] == ["picture number 0", "picture number 0",
                                                              "picture number 1", "picture number 0"]


def test_image_suffixes_match_whatever_their_case(tmp_path):
    """``photo.PNG`` is picked up by the default ``.png`` extension, and an ``.JPG`` extension given in capitals
    picks up ``photo.jpg``; other files are not samples."""
    Image.new("RGB", (40, 24), "red").save(tmp_path / "shout.PNG", format="PNG")
    (tmp_path / "shout.txt").write_text("an upper-case suffix")
    Image.new("RGB", (24, 40), "blue").save(tmp_path / "quiet.jpg")
    (tmp_path / "quiet.txt").write_text("a lower-case suffix")
    (tmp_path / "notes.md").write_text("not an image")
    dataset = ImageFolderDataset(ImageFolderConfig(path=str(tmp_path)))
    assert sorted(dataset.caption(index) for index in range(len(dataset))) == ["a lower-case suffix",
                                                                              "an upper-case suffix"]
    only_jpeg = ImageFolderDataset(ImageFolderConfig(path=str(tmp_path), extensions=(".JPG",)))
    assert [only_jpeg.caption(0), only_jpeg.image_size(0)] == ["a lower-case suffix", (24, 40)]


@pytest.mark.parametrize("width, height", [(True, 32), (32, True), (40.0, 24), (40, -1)])
def test_manifest_sizes_must_be_whole_positive_numbers_not_booleans(tmp_path, width, height):
    """JSON ``true``, ``40.0`` and negative numbers are not a (width, height) in pixels: the line is refused."""
    _write_images(tmp_path, 1, captions=False)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": "img000.png", "caption": "x", "width": width, "height": height}) + "\n")
    with pytest.raises(ValueError, match=r"line 1: 'width' and 'height' must be given together as positive integers"):
        ImageFolderDataset(ImageFolderConfig(path=str(manifest)))


def test_a_manifest_line_with_an_unknown_key_is_refused_naming_it(tmp_path):
    """A misspelt field (``captoin``) is not silently ignored: the line is refused naming it and the known keys."""
    _write_images(tmp_path, 1, captions=False)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": "img000.png", "caption": "x", "captoin": "y"}) + "\n")
    with pytest.raises(ValueError, match=r"line 1: unknown keys \['captoin'\]; known: "
                                         r"\['caption', 'height', 'image', 'width'\]"):
        ImageFolderDataset(ImageFolderConfig(path=str(manifest)))


@pytest.mark.parametrize("caption", [5, ["a", "list"], None])
def test_a_manifest_caption_that_is_not_a_string_is_refused(tmp_path, caption):
    """Numbers, lists and null are not captions: the line is refused with the value it found."""
    _write_images(tmp_path, 1, captions=False)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": "img000.png", "caption": caption}) + "\n")
    with pytest.raises(ValueError, match=r"line 1: image .*img000\.png has no caption \(expected a string 'caption' "
                                         r"field, found " + repr(caption).replace("[", r"\[").replace("]", r"\]")):
        ImageFolderDataset(ImageFolderConfig(path=str(manifest)))
