"""Aspect-ratio buckets: NextStep-1's grids, nearest-ratio assignment, resize-and-crop."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from nextstep.training.data.buckets import AspectRatioBuckets, resize_and_crop, token_grids

RELEASE_256 = [(8, 32), (9, 28), (10, 25), (11, 23), (12, 21), (13, 19), (14, 18), (15, 17), (16, 16)]


def test_256px_grids_are_the_released_seventeen():
    expected = set(RELEASE_256) | {(w, h) for h, w in RELEASE_256}
    assert set(token_grids(16)) == expected and len(token_grids(16)) == 17


def test_512px_buckets_double_the_256px_ones():
    sizes = AspectRatioBuckets(512, grid_multiple=2).sizes
    assert set(sizes) == {(32 * h, 32 * w) for h, w in token_grids(16)}


@given(st.integers(2, 40))
def test_grids_hold_about_the_square_area_within_ratio_four(side):
    for height, width in token_grids(side):
        assert height * width <= side * side
        assert height * width >= side * side - max(height, width)
        assert max(height, width) / min(height, width) <= 4


@given(st.integers(1, 4000), st.integers(1, 4000))
def test_assignment_picks_the_nearest_ratio(width, height):
    buckets = AspectRatioBuckets(256)
    chosen = buckets.assign(width, height)
    error = abs(math.log(chosen[1] / chosen[0]) - math.log(width / height))
    assert all(error <= abs(math.log(w / h) - math.log(width / height)) + 1e-12 for h, w in buckets.sizes)


@given(st.integers(1, 300), st.integers(1, 300), st.sampled_from(AspectRatioBuckets(64).sizes))
def test_resize_and_crop_gives_the_bucket_size(width, height, size):
    image = Image.new("RGB", (width, height), "red")
    out = resize_and_crop(image, *size)
    assert out.size == (size[1], size[0])


def test_resize_and_crop_keeps_the_exact_centre():
    """A picture half red, half blue, wider than its bucket: the crop is centred to the sub-pixel, so the
    colours split at the middle column and mirror each other; a long strip is cropped before it is scaled."""
    import numpy as np

    picture = Image.new("RGB", (303, 70), "red")  # scaled to 277 wide: a crop of 64 starts at 106.5
    picture.paste((128, 0, 128), (151, 0, 152, 70))
    picture.paste((0, 0, 255), (152, 0, 303, 70))
    out = np.asarray(resize_and_crop(picture, 64, 64)).astype(int)
    assert out.shape == (64, 64, 3)
    np.testing.assert_allclose(out[:, :32, 0], out[:, 32:, 2][:, ::-1], atol=1)  # mirror images
    assert (out[:, 0] == (255, 0, 0)).all() and (out[:, -1] == (0, 0, 255)).all()
    strip = Image.new("RGB", (20000, 2), "green")
    assert np.asarray(resize_and_crop(strip, 128, 512)).reshape(-1, 3).tolist() == [[0, 128, 0]] * 128 * 512


def test_bad_resolution_is_refused():
    with pytest.raises(ValueError, match="multiple of 16"):
        AspectRatioBuckets(100)


def test_a_wide_picture_is_cropped_to_its_middle_not_squashed():
    import numpy as np

    picture = Image.new("RGB", (300, 100), "red")
    picture.paste((0, 255, 0), (100, 0, 200, 100))
    picture.paste((0, 0, 255), (200, 0, 300, 100))
    crop = np.asarray(resize_and_crop(picture, 64, 64)).astype(int)
    assert (abs(crop[:, 4:-4] - [0, 255, 0]) <= 2).all()


def test_a_tall_picture_is_cropped_about_its_middle():
    import numpy as np

    picture = Image.new("RGB", (70, 303), "red")
    picture.paste((128, 0, 128), (0, 151, 70, 152))
    picture.paste((0, 0, 255), (0, 152, 70, 303))
    crop = np.asarray(resize_and_crop(picture, 64, 64)).astype(int)
    assert (crop[0] == (255, 0, 0)).all() and (crop[-1] == (0, 0, 255)).all()
    np.testing.assert_allclose(crop[:32, :, 0], crop[32:, :, 2][::-1], atol=1)


@pytest.mark.parametrize("resolution", [0, -16, 8])
def test_a_resolution_below_one_token_is_refused(resolution):
    """The square side must be a positive multiple of the pixels per token: 0, -16 and 8 px are refused."""
    with pytest.raises(ValueError, match="resolution must be a positive multiple of 16 pixels"):
        AspectRatioBuckets(resolution)


@pytest.mark.parametrize("grid_multiple", [0, 3, 5])
def test_a_grid_multiple_that_does_not_divide_the_side_is_refused(grid_multiple):
    """256 px buckets are 16 tokens a side: grid multiples 1, 2, 4, 8 and 16 build them, 0, 3 and 5 are refused."""
    with pytest.raises(ValueError, match=r"grid_multiple must be a positive divisor of the side in tokens \(16\)"):
        AspectRatioBuckets(256, grid_multiple=grid_multiple)
    for divisor in (1, 2, 4, 8, 16):
        sizes = AspectRatioBuckets(256, grid_multiple=divisor).sizes
        assert (256, 256) in sizes and all(h % (16 * divisor) == 0 == w % (16 * divisor) for h, w in sizes)


@pytest.mark.parametrize("size", [(0, 10), (10, 0), (-4, 10), (10, -4)])
def test_an_image_size_that_is_not_positive_is_refused_by_name(size):
    """Assigning a bucket to a (width, height) with a side of 0 or less raises a ValueError naming the size."""
    with pytest.raises(ValueError, match=f"image size must be positive, found {size[0]}x{size[1]}"):
        AspectRatioBuckets(64).assign(*size)


@pytest.mark.parametrize("image_size", [(64, 32), (32, 64), (64, 200), (200, 64)])
def test_an_image_sharing_one_side_with_its_bucket_is_still_resized_to_it(image_size):
    """Only an image of the bucket's exact size is returned as it is: one that shares a single side with the
    64x64 bucket is still scaled and cropped to 64x64."""
    image = Image.new("RGB", image_size, "red")
    out = resize_and_crop(image, 64, 64)
    assert out.size == (64, 64)
    same = Image.new("RGB", (64, 64), "blue")
    assert resize_and_crop(same, 64, 64) is same


def test_a_data_config_builds_the_buckets_it_describes():
    """``resolution=512, multi_aspect=True, grid_multiple=2`` gives NextStep-1's 512 px buckets (the 256 px
    grids doubled); ``multi_aspect=False`` gives the one square bucket."""
    from nextstep.training.data import DataConfig

    config = DataConfig(datasets=({"type": "shapes"},), resolution=512, multi_aspect=True, grid_multiple=2)
    buckets = config.buckets()
    assert (buckets.resolution, buckets.multi_aspect, buckets.grid_multiple) == (512, True, 2)
    assert set(buckets.sizes) == {(32 * h, 32 * w) for h, w in token_grids(16)}
    square = DataConfig(datasets=({"type": "shapes"},), resolution=64).buckets(pixels_per_token=8)
    assert square.sizes == [(64, 64)] and square.pixels_per_token == 8


def test_a_data_resolution_is_checked_against_the_tokenizer_s_pixels_per_token_not_16():
    from nextstep.training.data.source import DataConfig

    config = DataConfig(datasets=({"type": "shapes"},), resolution=40)  # 5 tokens of 8 px
    assert config.buckets(8).resolution == 40
    with pytest.raises(ValueError, match="resolution must be a positive multiple of 16 pixels"):
        config.buckets(16)
    with pytest.raises(ValueError, match="resolution must be a positive integer"):
        DataConfig(datasets=({"type": "shapes"},), resolution=0)
