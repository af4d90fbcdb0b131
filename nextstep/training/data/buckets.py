"""Aspect-ratio buckets: every batch holds images of one size, chosen to fit each image's shape.

NextStep-1 trains at 256 px on 17 token grids of about 256 tokens each:
(8, 32), (9, 28), ..., (15, 17), (16, 16) and their transposes. `token_grids`
rebuilds that family for any resolution: for a square side of ``s`` tokens, the
heights ``s/2 .. s`` with width ``floor(s*s / h)``, plus the transposes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image


def token_grids(side_tokens: int, max_ratio: float = 4.0) -> list[tuple[int, int]]:
    """Token grids (h, w) of about ``side_tokens**2`` tokens with aspect up to ``max_ratio``.

    Args:
        side_tokens: side of the square grid (resolution / 16).
        max_ratio: largest long/short side ratio.

    Returns:
        grids sorted by aspect ratio w/h, the square one included, e.g. 17 grids
        for ``side_tokens=16``.
    """
    if side_tokens < 1:
        raise ValueError(f"side_tokens must be >= 1, found {side_tokens!r}")
    area = side_tokens * side_tokens
    grids = set()
    for height in range(max(1, math.ceil(side_tokens / 2)), side_tokens + 1):
        width = area // height
        if max(height, width) / min(height, width) <= max_ratio + 1e-9:
            grids.add((height, width))
            grids.add((width, height))
    return sorted(grids, key=lambda g: g[1] / g[0])


@dataclass(frozen=True)
class AspectRatioBuckets:
    """Maps image shapes to bucket sizes in pixels.

    Args:
        resolution: side in pixels of the square bucket (a multiple of ``pixels_per_token``).
        pixels_per_token: pixels per token side (16 for an f8 VAE with 2x2 patches).
        multi_aspect: use the whole `token_grids` family; False keeps only the square.
        grid_multiple: build the family at ``1 / grid_multiple`` of the side and
            scale it up (NextStep-1's 512 px buckets are its 256 px ones with
            both sides doubled: ``resolution=512, grid_multiple=2``).
    """

    resolution: int
    pixels_per_token: int = 16
    multi_aspect: bool = True
    grid_multiple: int = 1

    def __post_init__(self) -> None:
        if self.resolution < self.pixels_per_token or self.resolution % self.pixels_per_token:
            raise ValueError(
                f"resolution must be a positive multiple of {self.pixels_per_token} pixels, "
                f"found {self.resolution!r}"
            )
        side = self.resolution // self.pixels_per_token
        if self.grid_multiple < 1 or side % self.grid_multiple:
            raise ValueError(
                f"grid_multiple must be a positive divisor of the side in tokens ({side}), "
                f"found {self.grid_multiple!r}"
            )

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """Bucket sizes (height, width) in pixels, sorted by aspect ratio."""
        side = self.resolution // self.pixels_per_token // self.grid_multiple
        grids = token_grids(side) if self.multi_aspect else [(side, side)]
        step = self.pixels_per_token * self.grid_multiple
        return [(h * step, w * step) for h, w in grids]

    def assign(self, width: int, height: int) -> tuple[int, int]:
        """The bucket (height, width) whose aspect ratio is closest to ``width / height``."""
        if width <= 0 or height <= 0:
            raise ValueError(f"image size must be positive, found {width}x{height}")
        target = math.log(width / height)
        return min(self.sizes, key=lambda s: abs(math.log(s[1] / s[0]) - target))


def resize_and_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    """Scale ``image`` to cover ``height`` x ``width`` (aspect kept) and centre-crop to it.

    Only the part that is kept is resampled (the crop's box in the source's pixels), so
    a very long strip is not first enlarged whole.
    """
    source_width, source_height = image.size
    if (source_width, source_height) == (width, height):
        return image
    scale = max(width / source_width, height / source_height)
    box_width, box_height = min(width / scale, source_width), min(height / scale, source_height)
    left, top = max((source_width - box_width) / 2, 0.0), max((source_height - box_height) / 2, 0.0)
    return image.resize((width, height), Image.Resampling.BICUBIC, box=(left, top, left + box_width, top + box_height),
                        reducing_gap=None if scale > 0.5 else 3.0)
