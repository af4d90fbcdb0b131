"""Evaluation scoring: per-image metrics, ridge maps on degenerate features, sampling settings, photo crops,
GenEval's rule for requirements of several objects."""

import numpy as np
import pytest
import torch
from PIL import Image

from nextstep.evaluation.distribution_metrics import RidgeMap
from nextstep.evaluation.image_metrics import ssim
from nextstep.evaluation.photo_bank import Photo, random_crops
from nextstep.evaluation.sampling import SamplingSettings
from nextstep.evaluation.shapes_detector import Detection
from nextstep.evaluation.shapes_geneval import score_image


def _detection(shape, colour, box, score=0.9):
    left, top, right, bottom = box
    return Detection(shape=shape, colour=colour, center=((left + right) / 128, (top + bottom) / 128), box=box,
                     area=(right - left) * (bottom - top), score=score)


def test_ssim_scores_each_image_of_a_batch_on_its_own():
    """ssim returns one value per image (B,), and an image's value does not depend on the others of the batch."""
    generator = torch.Generator().manual_seed(0)
    reference = torch.rand(3, 3, 16, 16, generator=generator) * 2 - 1  # (B, 3, H, W)
    noisy = (reference + 0.3 * torch.randn(3, 3, 16, 16, generator=generator)).clamp(-1, 1)
    batch = torch.stack([reference[0], noisy[1], noisy[2]])
    scores = ssim(batch, reference)
    assert scores.shape == (3,)
    assert scores[0] == pytest.approx(1.0, abs=1e-5)
    assert scores[1] < 0.99 and scores[2] < 0.99
    for i in range(3):
        assert scores[i] == pytest.approx(float(ssim(batch[i:i + 1], reference[i:i + 1])[0]), abs=1e-6)


def test_a_ridge_map_with_a_constant_feature_stays_finite_and_ignores_it():
    """A feature column with no spread (N, D_in) gives a finite map, the same as without that column."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(40, 3, generator=generator, dtype=torch.float64)
    y = x @ torch.randn(3, 2, generator=generator, dtype=torch.float64) + 1.0  # (N, D_out)
    with_constant = torch.cat([x, torch.full((40, 1), 7.0, dtype=torch.float64)], 1)  # (N, D_in + 1)
    ridge = RidgeMap.fit(with_constant, y, alpha=1.0)
    assert torch.isfinite(ridge.weight).all()
    torch.testing.assert_close(ridge(with_constant), RidgeMap.fit(x, y, alpha=1.0)(x))


def test_sampling_settings_refuse_no_candidates():
    """candidates must be None or at least 1; 0 samples per image is refused naming the field."""
    assert SamplingSettings(candidates=1).candidates == 1
    with pytest.raises(ValueError, match="candidates"):
        SamplingSettings(candidates=0)


def test_sampling_settings_from_a_model_s_defaults_keep_its_candidates_and_their_score():
    """from_defaults copies the generation block's candidates and candidate_score."""
    from nextstep.generation_defaults import GenerationDefaults

    defaults = GenerationDefaults(candidates=3, candidate_score="caption")
    settings = SamplingSettings.from_defaults(defaults)
    assert (settings.candidates, settings.candidate_score) == (3, "caption")
    assert SamplingSettings.from_defaults(defaults, candidate_score="flow").candidate_score == "flow"


def test_a_photo_exactly_the_crop_size_is_cropped_whole():
    """A size x size photo gives size x size crops that are the whole photo, or its mirror image."""
    pixels = np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3)
    photo = Photo("tile", Image.fromarray(pixels))
    crops = random_crops([photo], 8, 16, seed=0)  # (8, 3, 16, 16) in [-1, 1]
    whole = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1.0  # (3, 16, 16)
    for crop in crops:
        assert torch.equal(crop, whole) or torch.equal(crop, whole.flip(-1))


def test_a_crop_can_reach_every_column_and_row_of_the_photo():
    """Crops at native scale start anywhere from the first to the last fitting offset, edges included."""
    width, height, size = 20, 18, 16
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, -1] = 255  # the last column white
    pixels[-1, :, 1] = 255  # the last row green
    photo = Photo("edges", Image.fromarray(pixels))
    crops = random_crops([photo], 64, size, seed=0, scales=(1.0, 1.0))  # (64, 3, 16, 16)
    shows_last_column = (crops[:, 0] == 1.0).all(1).any(1)  # a column of red 255 from top to bottom
    shows_last_row = (crops[:, 1] == 1.0).all(-1).any(-1)  # a row of green 255 from left to right
    assert shows_last_column.any() and shows_last_row.any()


def test_a_coloured_requirement_needs_every_counted_object_in_its_colour():
    """GenEval's rule: all ``count`` best detections of the class must have the required colour."""
    entry = {"tag": "custom", "include": [{"class": "circle", "count": 2, "color": "red"}]}
    red = _detection("circle", "red", (0, 0, 10, 10))
    blue = _detection("circle", "blue", (30, 30, 40, 40), score=0.8)
    other_red = _detection("circle", "red", (30, 0, 40, 10), score=0.7)
    correct, reason = score_image([red, blue], entry)
    assert not correct and "red" in reason
    assert score_image([red, other_red], entry) == (True, "")
    assert not score_image([red, blue, other_red], entry)[0]  # the two best are red and blue


def test_a_position_requirement_holds_for_every_counted_subject():
    """GenEval's rule: each of the ``count`` subjects must stand in the relation to the reference."""
    entry = {"tag": "custom", "include": [{"class": "square", "count": 1},
                                          {"class": "circle", "count": 2, "position": ["left of", 0]}]}
    square = _detection("square", "red", (28, 28, 36, 36))
    left = _detection("circle", "blue", (0, 28, 8, 36))
    right = _detection("circle", "blue", (56, 28, 64, 36))
    correct, reason = score_image([square, left, right], entry)
    assert not correct and "is not left of" in reason
    far_left = _detection("circle", "green", (0, 0, 8, 8))
    assert score_image([square, left, far_left], entry) == (True, "")


def test_an_image_missing_the_first_of_two_objects_is_wrong_even_when_the_second_is_there():
    """Every include entry must be met: a failed first requirement is not undone by a met second one."""
    from nextstep.evaluation.shapes_geneval import geneval_entry

    entry = geneval_entry("two_object", ("circle", "square"))
    square = _detection("square", "red", (28, 28, 36, 36))
    circle = _detection("circle", "blue", (0, 0, 8, 8))
    correct, reason = score_image([square], entry)
    assert not correct and reason == "expected 1 circle, found 0"
    assert score_image([circle, square], entry) == (True, "")


def test_detector_regions_join_pixels_that_touch_only_at_a_corner():
    """Regions are 8-connected: a diagonal staircase is one region; pixels two apart are two."""
    from nextstep.evaluation.shapes_detector import _regions

    mask = np.zeros((6, 6), bool)  # (H, W)
    for i in range(5):
        mask[i, i] = True  # a diagonal: each pixel touches the next only at a corner
    (region,) = _regions(mask)
    assert sorted(map(tuple, region.tolist())) == [(i, i) for i in range(5)]
    apart = np.zeros((3, 5), bool)
    apart[1, 0] = apart[1, 2] = apart[1, 4] = True
    assert len(_regions(apart)) == 3


def test_the_detector_takes_pixels_as_far_from_their_palette_colour_as_colour_distance_allows():
    """colour_distance bounds how far a pixel may be from its palette colour, separately from the
    foreground threshold: a dark blue about 99 from the palette's blue counts under the default 120, not under 80."""
    from nextstep.evaluation.shapes_detector import DetectorConfig, detect_shapes

    image = np.full((64, 64, 3), 255, np.uint8)  # (H, W, 3)
    image[10:30, 20:40] = (0, 20, 150)  # distance sqrt(37^2 + 60^2 + 70^2) ~ 99.3 from blue (37, 80, 220)
    (found,) = detect_shapes(image)
    assert (found.shape, found.colour, found.box) == ("square", "blue", (20, 10, 40, 30))
    assert detect_shapes(image, DetectorConfig(colour_distance=80.0)) == []
    assert len(detect_shapes(image, DetectorConfig(colour_distance=100.0, foreground_distance=200.0))) == 1


@pytest.mark.parametrize("scale", [1e-30, 1e-15, 1e-3, 1.0, 1e6])
def test_retrieval_ranks_do_not_depend_on_the_length_of_queries_or_candidates(scale):
    """Ranks are by cosine similarity: scaling queries or candidates (N, D) by a positive factor changes no rank."""
    from nextstep.evaluation.distribution_metrics import retrieval_ranks

    generator = torch.Generator().manual_seed(2)
    queries = torch.randn(12, 5, generator=generator, dtype=torch.float64)  # (N, D)
    candidates = queries + 0.8 * torch.randn(12, 5, generator=generator, dtype=torch.float64)  # (N, D)
    expected = retrieval_ranks(queries, candidates)
    assert expected.tolist() != [11] * 12  # a real ranking, not all ties
    assert torch.equal(retrieval_ranks(queries * scale, candidates), expected)
    assert torch.equal(retrieval_ranks(queries, candidates * scale), expected)
