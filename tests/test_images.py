"""Image conversions: a PIL image reads the same through the API as through the command line and training."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from nextstep.images import from_pil, image_grid, read_image_file, to_pil, to_rgb


def test_a_pil_image_reads_as_its_file_does(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 32 wide, shown turned a quarter: 16 wide, 32 tall
    Image.new("RGB", (32, 16), (200, 30, 30)).save(tmp_path / "phone.jpg", exif=exif.tobytes())
    Image.new("RGBA", (16, 16), (255, 0, 0, 0)).save(tmp_path / "clear.png")  # fully transparent red
    for name in ("phone.jpg", "clear.png"):
        with Image.open(tmp_path / name) as opened:
            through_api = from_pil([opened])
        through_file = from_pil([read_image_file(tmp_path / name)])
        assert torch.equal(through_api, through_file), name
    assert through_api.shape == (1, 3, 16, 16) and bool((through_api == 1).all())  # transparent: white
    with Image.open(tmp_path / "phone.jpg") as opened:
        assert from_pil([opened]).shape == (1, 3, 32, 16)  # upright


def test_conversions_round_trip_every_level():
    levels = torch.arange(256, dtype=torch.uint8).repeat(3, 1)[None, :, None, :]  # (1, 3, 1, 256)
    image = Image.fromarray(levels[0].permute(1, 2, 0).numpy(), mode="RGB")
    tensor = from_pil([image])
    assert tensor.min() == -1 and tensor.max() == 1
    assert to_pil(tensor)[0].tobytes() == image.tobytes()


def test_an_image_with_nan_values_is_refused_before_it_is_encoded(tiny_model):
    images = torch.zeros(1, 3, 32, 32)
    images[0, 0, 3, 3] = math.nan
    with pytest.raises(ValueError, match="image values must be finite numbers in \\[-1, 1\\], found NaN"):
        tiny_model.image_tokenizer.encode(images)
    with pytest.raises(ValueError, match="finite numbers"):
        tiny_model.generate("x", images=images, num_steps=1)


def test_a_grid_names_mixed_sizes_and_bad_columns():
    small, large = Image.new("RGB", (16, 16)), Image.new("RGB", (32, 32))
    with pytest.raises(ValueError, match=r"a grid needs images of one size, found sizes \[\(16, 16\), \(32, 32\)\]"):
        image_grid([large, small])
    with pytest.raises(ValueError, match="columns must be None or an integer >= 1, found -1"):
        image_grid([small, small], columns=-1)
    assert image_grid([small] * 3, columns=2).size == (32, 32)


def test_a_source_image_the_tokenizer_cannot_take_is_named(tiny_model):
    with pytest.raises(ValueError, match=r"input image\(s\) \[1\] of 32x40 pixels: .*multiple"):
        tiny_model.generate(["a", "b"], images=[torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 40)], num_steps=1)


@pytest.mark.parametrize("levels, grey", [(0.5, 128), (1.0, 255), (0.0, 0), (128.0, 128), (300.0, 255)])
def test_float_grey_levels_are_read_in_their_range(tmp_path, levels, grey):
    path = tmp_path / "grey.tiff"
    Image.fromarray(np.full((4, 6), levels, np.float32)).save(path)
    image = read_image_file(path)
    assert image.mode == "RGB" and image.size == (6, 4) and image.getpixel((0, 0)) == (grey, grey, grey)


def test_non_finite_float_levels_are_named():
    image = Image.fromarray(np.array([[0.5, np.nan]], np.float32))
    with pytest.raises(ValueError, match="finite grey levels in a 32-bit float image, found 1 NaN or infinite"):
        to_rgb(image)


def _colours(count):
    from PIL import Image

    return [Image.new("RGB", (4, 4), (40 * (i + 1), 0, 0)) for i in range(count)]


def test_to_pil_clamps_values_outside_the_range():
    from nextstep.images import to_pil

    images = torch.tensor([1.5, -1.5, 1.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    assert to_pil(images)[0].getpixel((0, 0)) == (255, 0, 255)


def test_the_grid_fills_rows_first():
    from nextstep.images import image_grid

    grid = image_grid(_colours(3), columns=2)
    assert grid.getpixel((5, 1))[0] == 80 and grid.getpixel((1, 5))[0] == 120  # image 1 right of 0, 2 below


def test_the_grid_is_the_square_root_rounded_up_wide_by_default():
    from nextstep.images import image_grid

    assert image_grid(_colours(3)).size == (8, 8)
    assert image_grid(_colours(2)).size == (8, 4)


def test_a_grid_of_tensors_points_to_to_pil():
    with pytest.raises(TypeError, match=r"image_grid takes PIL images, found Tensor "
                                        r"\(nextstep.images.to_pil converts tensors\)"):
        image_grid([torch.zeros(3, 8, 8)])
    with pytest.raises(TypeError, match="image_grid takes a list of PIL images, found one Tensor"):
        image_grid(torch.zeros(1, 3, 8, 8))
    with pytest.raises(TypeError, match="image_grid takes PIL images, found str$"):
        image_grid([Image.new("RGB", (4, 4)), "image.png"])


def test_dark_sixteen_bit_grey_levels_are_scaled_from_the_sixteen_bit_range():
    levels = np.array([[0, 200, 255]], np.uint16)
    image = Image.fromarray(levels)
    assert image.mode == "I;16"
    rgb = to_rgb(image)
    assert [rgb.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (1, 1, 1), (1, 1, 1)]


def test_a_transparent_grey_level_of_a_sixteen_bit_png_is_laid_over_the_background(tmp_path):
    levels = np.array([[1000, 65535, 0]], np.uint16)
    Image.fromarray(levels).save(tmp_path / "grey.png", transparency=1000)
    with Image.open(tmp_path / "grey.png") as opened:
        assert opened.mode.startswith("I") and opened.info.get("transparency") == 1000
        rgb = to_rgb(opened)
    assert [rgb.getpixel((x, 0)) for x in range(3)] == [(255, 255, 255), (255, 255, 255), (0, 0, 0)]
    assert to_rgb(Image.open(tmp_path / "grey.png"), background=(0, 0, 0)).getpixel((0, 0)) == (0, 0, 0)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_the_oriented_size_is_the_size_of_the_upright_image(tmp_path, orientation):
    from nextstep.images import oriented_size

    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.new("RGB", (32, 16), (200, 30, 30)).save(tmp_path / "photo.jpg", exif=exif.tobytes())
    with Image.open(tmp_path / "photo.jpg") as opened:
        size = oriented_size(opened)
        assert size == to_rgb(opened).size
    assert size == ((16, 32) if orientation in (5, 6, 7, 8) else (32, 16))


def test_a_grid_of_wide_images_tiles_them_edge_to_edge():
    tiles = [Image.new("RGB", (6, 2), (40 * (i + 1), 0, 0)) for i in range(4)]
    grid = np.asarray(image_grid(tiles, columns=2))
    expected = np.block([[np.full((2, 6), 40), np.full((2, 6), 80)],
                         [np.full((2, 6), 120), np.full((2, 6), 160)]])
    assert grid.shape == (4, 12, 3)
    assert np.array_equal(grid[..., 0], expected)


def test_a_png_whose_orientation_follows_its_pixels_is_read_at_the_size_its_header_gives(tmp_path):
    import struct

    from nextstep.images import oriented_size, read_image_file

    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (32, 48), (200, 30, 30)).save(tmp_path / "early.png", exif=exif.tobytes())
    data = (tmp_path / "early.png").read_bytes()
    chunks, position = [], 8
    while position < len(data):
        length = struct.unpack(">I", data[position:position + 4])[0]
        chunks.append((data[position + 4:position + 8], data[position:position + 12 + length]))
        position += 12 + length
    exif_chunks = [chunk for kind, chunk in chunks if kind == b"eXIf"]
    rest = [chunk for kind, chunk in chunks if kind != b"eXIf"]
    (tmp_path / "late.png").write_bytes(data[:8] + b"".join(rest[:-1]) + b"".join(exif_chunks) + rest[-1])
    for name in ("early.png", "late.png"):
        with Image.open(tmp_path / name) as opened:
            size = oriented_size(opened)
        assert read_image_file(tmp_path / name).size == size, name
    assert read_image_file(tmp_path / "early.png").size == (48, 32)  # turned a quarter
