"""An exact detector for the shapes world: what objects an image shows, their colour and place.

The world draws flat shapes in six far-apart colours on a white background, so
detection needs no learning:

1. a pixel is foreground when it is far from the background colour; it takes
   the label of the nearest palette colour;
2. each 8-connected region of one label is a candidate object (regions smaller
   than ``min_area`` pixels are edge fringes or noise and are dropped);
3. the candidate's shape is the template (circle, square, triangle, drawn by the
   world's own renderer in the candidate's bounding box, at a few sizes, and
   cut at the same pixel coverage as the foreground) whose mask overlaps it
   best; the intersection over union is the detection's score, and candidates
   below ``min_score`` match no shape.

On rendered ground truth it recovers every object exactly
(``tests/test_eval_shapes.py``); on generated images it is as strict as the
shapes are clean.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
from PIL import Image

from nextstep.training.data.shapes.metadata import COLOURS, SHAPES, Scene, ShapeObject
from nextstep.training.data.shapes.render import render_scene

#: Triangles are drawn equilateral: their box is this much less tall than wide.
TRIANGLE_HEIGHT = 3 ** 0.5 / 2


@dataclass(frozen=True)
class Detection:
    """One detected object.

    Attributes:
        shape: the best-matching shape of `SHAPES`.
        colour: the palette colour of its pixels.
        center: (x, y) of its bounding-box centre as fractions of width and height.
        box: (left, top, right, bottom) in pixels, right and bottom exclusive.
        area: its pixel count.
        score: intersection over union with the best shape template, in [0, 1].
    """

    shape: str
    colour: str
    center: tuple[float, float]
    box: tuple[int, int, int, int]
    area: int
    score: float


@dataclass(frozen=True)
class DetectorConfig:
    """Thresholds of `detect_shapes`.

    Args:
        foreground_distance: RGB distance from the background above which a pixel is foreground.
        colour_distance: largest RGB distance from its palette colour a pixel may have.
        min_area_fraction: smallest region kept, as a share of the image's pixels.
        min_score: smallest template overlap (IoU) for a region to count as a shape.
    """

    foreground_distance: float = 90.0
    colour_distance: float = 120.0
    min_area_fraction: float = 0.004
    min_score: float = 0.5


def _as_array(image: "Image.Image | np.ndarray") -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), found shape {array.shape}")
    return array.astype(np.float32)


def _regions(mask: np.ndarray) -> list[np.ndarray]:
    """The 8-connected regions of a boolean (H, W) mask, each as an (N, 2) array of (row, column)."""
    height, width = mask.shape
    seen = np.zeros_like(mask)
    regions = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        queue, pixels = deque([start]), []
        while queue:
            row, col = queue.popleft()
            pixels.append((row, col))
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    r, c = row + dr, col + dc
                    if 0 <= r < height and 0 <= c < width and mask[r, c] and not seen[r, c]:
                        seen[r, c] = True
                        queue.append((r, c))
        regions.append(np.array(pixels))
    return regions


#: Sides tried for a template, in pixels less than the region's box: a box holds the
#: partly covered edge pixels too, so the drawn shape is up to a pixel and a half smaller.
SIDE_SHRINKS = (0.0, 0.5, 1.0, 1.5)


def _template(shape: str, box: tuple[int, int, int, int], shrink: float, height: int, width: int,
              coverage: float) -> np.ndarray:
    """The (H, W) mask of ``shape`` drawn by the world's renderer in ``box`` with its side ``shrink``
    pixels shorter: the pixels it covers by more than ``coverage`` (a share in [0, 1])."""
    left, top, right, bottom = box
    box_w, box_h = right - left, bottom - top
    side = max(box_w, box_h / TRIANGLE_HEIGHT) if shape == "triangle" else max(box_w, box_h)
    center = ((left + right) / 2 / width, (top + bottom) / 2 / height)
    obj = ShapeObject(shape, "red", center, min(1.0, max(side - shrink, 1.0) / min(width, height)))
    scene = Scene((obj,), "", "colors", background=(0, 0, 0))
    drawn = np.asarray(render_scene(scene, width, height))[..., 0]
    return drawn > COLOURS["red"][0] * coverage


def detect_shapes(image: "Image.Image | np.ndarray", config: DetectorConfig | None = None,
                  background: tuple[int, int, int] = (255, 255, 255)) -> list[Detection]:
    """The objects in ``image``, best score first.

    Args:
        image: a PIL image or an (H, W, 3) uint8 array.
        config: thresholds (defaults suit the world's renders at 32 pixels and up).
        background: the background colour.
    """
    config = config or DetectorConfig()
    pixels = _as_array(image)
    height, width = pixels.shape[:2]
    foreground = np.linalg.norm(pixels - np.asarray(background, np.float32), axis=-1) > config.foreground_distance
    palette = np.asarray(list(COLOURS.values()), np.float32)
    distances = np.linalg.norm(pixels[:, :, None, :] - palette, axis=-1)
    labels = distances.argmin(-1)
    close = distances.min(-1) <= config.colour_distance
    names = list(COLOURS)
    min_area = max(1, round(config.min_area_fraction * height * width))
    detections = []
    for index, colour in enumerate(names):
        for region in _regions(foreground & close & (labels == index)):
            if len(region) < min_area:
                continue
            mask = np.zeros((height, width), bool)
            mask[region[:, 0], region[:, 1]] = True
            top, left = region.min(0)
            bottom, right = region.max(0) + 1
            box = (int(left), int(top), int(right), int(bottom))
            # A pixel is foreground when it covers the colour by more than this share.
            coverage = config.foreground_distance / float(np.linalg.norm(palette[index] - np.asarray(background)))
            best_shape, best_score = "", 0.0
            for shape in SHAPES:
                for shrink in SIDE_SHRINKS:
                    template = _template(shape, box, shrink, height, width, coverage)
                    union = np.logical_or(mask, template).sum()
                    score = float(np.logical_and(mask, template).sum() / union) if union else 0.0
                    if score > best_score:
                        best_shape, best_score = shape, score
            if best_score < config.min_score:
                continue
            center = ((left + right) / 2 / width, (top + bottom) / 2 / height)
            detections.append(Detection(best_shape, colour, center, box, len(region), best_score))
    return sorted(detections, key=lambda d: -d.score)
