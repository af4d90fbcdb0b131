"""Reading image files into RGB, and conversions between PIL images and (B, 3, H, W) tensors in [-1, 1]."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

#: The EXIF tag of an image's orientation.
EXIF_ORIENTATION = 0x0112
#: Formats whose EXIF block comes before their pixels, so that reading it decodes nothing.
EXIF_HEADER_FORMATS = ("JPEG", "MPO", "WEBP", "TIFF")
#: Exceptions Pillow raises for unreadable or hostile files.
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def oriented_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened image as `to_rgb` will give it: swapped when its EXIF orientation
    turns it a quarter (read from the header, nothing decoded)."""
    width, height = image.size
    try:
        if image.format in EXIF_HEADER_FORMATS:
            exif = image.getexif()
        elif "exif" in image.info:  # an EXIF block read with the header (a PNG's eXIf chunk before its pixels)
            exif = Image.Exif()
            exif.load(image.info["exif"])
        else:  # elsewhere the EXIF block may follow the pixels
            return width, height
        orientation = exif.get(EXIF_ORIENTATION, 1)
    except (*IMAGE_ERRORS, KeyError):  # KeyError: an EXIF block Pillow cannot parse
        return width, height
    if orientation not in (5, 6, 7, 8) or _size_already_oriented(image):
        return width, height
    return height, width


#: The TIFF tags of the stored pixel width and height.
_TIFF_WIDTH, _TIFF_HEIGHT = 256, 257


def _size_already_oriented(image: Image.Image) -> bool:
    """Whether Pillow reports ``image.size`` with the orientation applied already (recent versions
    do for TIFF files): the size then differs from the one the file stores."""
    tags = getattr(image, "tag_v2", None)
    if image.format != "TIFF" or tags is None or _TIFF_WIDTH not in tags or _TIFF_HEIGHT not in tags:
        return False
    return image.size != (int(tags[_TIFF_WIDTH]), int(tags[_TIFF_HEIGHT]))


#: Modes of 16 or 32 bits per pixel, scaled to 8 bits (not clipped) on the way to RGB.
_WIDE_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """An RGB copy, the EXIF orientation applied (a PNG's from an eXIf chunk before its pixels, as
    `oriented_size` reads it); transparent pixels are composited over ``background``,
    16-bit grey levels are scaled to 8 bits, and 32-bit float grey levels are read as [0, 1] when none
    exceeds 1 (as [0, 255] otherwise).

    Raises:
        ValueError: a float image holding NaN or infinite levels.
    """
    if image.format != "PNG" or "exif" in image.info:
        image = ImageOps.exif_transpose(image)  # a copy, loaded
    else:  # a PNG's orientation counts only from an eXIf chunk before its pixels, as `oriented_size` reads it
        image = image.copy()  # (one after them is known only once the pixels are decoded)
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode == "F":
        levels = np.asarray(image, dtype=np.float64)
        if not np.isfinite(levels).all():
            raise ValueError(f"expected finite grey levels in a 32-bit float image, found "
                             f"{int((~np.isfinite(levels)).sum())} NaN or infinite")
        top = 1.0 if levels.max(initial=0) <= 1 else 255.0
        grey = np.clip(np.round(levels * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode in _WIDE_GREY_MODES:
        levels = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode != "I" or levels.max(initial=0) > 255 else 255.0
        grey = np.clip(np.round(levels * (255.0 / top)), 0, 255).astype(np.uint8)
        rgb = Image.fromarray(grey, mode="L").convert("RGB")
        key = image.info.get("transparency")
        if isinstance(key, (int, float)) and not isinstance(key, bool):  # a grey level that is transparent
            canvas = Image.new("RGB", rgb.size, background)
            canvas.paste(rgb, mask=Image.fromarray(np.where(levels == key, 0, 255).astype(np.uint8), mode="L"))
            return canvas
        return rgb
    if image.mode in ("RGBa", "La"):  # premultiplied alpha
        image = image.convert("RGBA" if image.mode == "RGBa" else "LA")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:  # an alpha channel or a key colour
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def read_image_file(path: str | Path) -> Image.Image:
    """The RGB image in the file at ``path``.

    Raises:
        FileNotFoundError: nothing at ``path``, or a folder.
        ValueError: a file that is not an image PIL can read.
    """
    path = Path(path)
    if not path.is_file():
        found = "a folder" if path.is_dir() else "nothing"
        raise FileNotFoundError(f"expected an image file at {path}, found {found}")
    try:
        with Image.open(path) as image:
            return to_rgb(image)
    except IMAGE_ERRORS as error:
        raise ValueError(f"expected an image file at {path}, found data PIL cannot read ({error})") from error


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> list of RGB PIL images (values clamped)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), found {tuple(images.shape)}")
    array = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    array = array.permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a, mode="RGB") for a in array]


def from_pil(images: list[Image.Image]) -> torch.Tensor:
    """PIL images of one size -> (B, 3, H, W) float32 in [-1, 1], each read as `to_rgb` reads it
    (upright as its EXIF orientation says, transparency over white, 16-bit grey scaled), as the
    command line and training read image files."""
    if not images:
        raise ValueError("expected at least one image, found none")
    images = [to_rgb(image) for image in images]
    sizes = {image.size for image in images}
    if len(sizes) != 1:
        raise ValueError(f"images must share one size, found {sorted(sizes)}")
    arrays = [np.asarray(image, dtype=np.float32) for image in images]
    tensor = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return tensor / 127.5 - 1.0


def as_image_list(images) -> list[torch.Tensor]:
    """PIL images, one (3, H, W) / (B, 3, H, W) tensor in [-1, 1], or a sequence of either
    -> one (1, 3, H, W) float tensor per image (sizes may differ)."""
    if isinstance(images, (Image.Image, torch.Tensor)):
        images = [images]
    expected = "images must be PIL images or a (B, 3, H, W) tensor in [-1, 1]"
    if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
        raise ValueError(f"{expected}, found {type(images).__name__}")
    tensors = []
    for image in images:
        if isinstance(image, Image.Image):
            tensors.append(from_pil([image]))
        elif isinstance(image, torch.Tensor):
            batch = image[None] if image.ndim == 3 else image
            if batch.ndim != 4 or batch.shape[1] != 3:
                raise ValueError(f"image tensors must have shape (B, 3, H, W), found {tuple(image.shape)}")
            if batch.shape[0] == 0:
                raise ValueError(f"image tensors must hold at least one image, found shape {tuple(image.shape)}")
            tensors.extend(batch.split(1))
        else:
            raise ValueError(f"{expected}, found a {type(image).__name__} among them")
    if not tensors:
        raise ValueError("expected at least one image, found none")
    return tensors


def image_grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    """Tile equally sized images into one grid image, row-major.

    Raises:
        TypeError: anything among ``images`` that is not a PIL image (a tensor, say).
        ValueError: no images, images of several sizes, or ``columns`` that is not None or an integer >= 1.
    """
    hint = " (nextstep.images.to_pil converts tensors)"
    if isinstance(images, (Image.Image, torch.Tensor)):
        raise TypeError(f"image_grid takes a list of PIL images, found one {type(images).__name__}"
                        f"{hint if isinstance(images, torch.Tensor) else ''}")
    if not images:
        raise ValueError("expected at least one image, found none")
    for image in images:
        if not isinstance(image, Image.Image):
            raise TypeError(f"image_grid takes PIL images, found {type(image).__name__}"
                            f"{hint if isinstance(image, torch.Tensor) else ''}")
    sizes = sorted({image.size for image in images})
    if len(sizes) != 1:
        raise ValueError(f"a grid needs images of one size, found sizes {sizes}")
    if columns is not None and (isinstance(columns, bool) or not isinstance(columns, int) or columns < 1):
        raise ValueError(f"columns must be None or an integer >= 1, found {columns!r}")
    columns = columns or int(np.ceil(np.sqrt(len(images))))
    rows = int(np.ceil(len(images) / columns))
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for index, image in enumerate(images):
        grid.paste(image, ((index % columns) * width, (index // columns) * height))
    return grid
