"""An exact detector for the shapes world: what objects an image shows, their colour and place.

The world draws flat shapes in six far-apart colours on a white background, so
detection needs no learning:

1. a pixel is foreground when it is far from the background colour; it takes
   the label of the nearest palette colour;
2. each 8-connected region of one label is a candidate object (regions smaller
   than ``min_area`` pixels are edge fringes or noise and are dropped);
3. the candidate's shape is found from its coverage map (how much of its colour
   each pixel shows, soft edge included): every shape is drawn by the world's own
   renderer with the area and centre of mass of that coverage, at a few sizes and
   blurs, and the best soft intersection over union wins; it is the detection's
   score, and candidates below ``min_score`` match no shape.

On rendered ground truth it recovers every object exactly, and on the shipped
image tokenizer's reconstructions of ground truth nearly always
(``tests/test_eval_shapes.py``); softness is forgiven, a wrong outline is not.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np
from PIL import Image

from nextstep.training.data.shapes.metadata import COLOURS, SHAPES, Scene, ShapeObject
from nextstep.training.data.shapes.render import render_scene


@dataclass(frozen=True)
class Detection:
    """One detected object.

    Attributes:
        shape: the best-matching shape of `SHAPES`.
        colour: the palette colour of its pixels.
        center: (x, y) of its bounding-box centre as fractions of width and height.
        box: (left, top, right, bottom) in pixels, right and bottom exclusive.
        area: its pixel count.
        score: soft intersection over union with the best-fitting drawn shape, in [0, 1].
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
        min_score: smallest soft intersection over union with the best-fitting drawn shape for
            a region to count as a shape.
    """

    foreground_distance: float = 90.0
    colour_distance: float = 120.0
    min_area_fraction: float = 0.004
    min_score: float = 0.5


def _as_array(image: "Image.Image | np.ndarray") -> np.ndarray:
    """(H, W, 3) float32 pixel values in [0, 255] of a PIL image or an (H, W, 3) uint8 array.

    Raises:
        ValueError: another shape, or another dtype (a float image in [0, 1] or [-1, 1] would
            otherwise be read as a near-black one and show nothing).
    """
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), found shape {array.shape}")
    if array.dtype != np.uint8:
        numeric = array.size and array.dtype.kind in "iuf"
        found = f"values in [{array.min():.4g}, {array.max():.4g}]" if numeric else "values"
        raise ValueError(f"expected an RGB image of uint8 values in [0, 255], found {array.dtype} {found}: "
                         "convert it (e.g. a float image in [0, 1]: (image * 255).round().astype(np.uint8))")
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


#: Area of each shape as a share of its side (or diameter) squared.
AREA_PER_SQUARED_SIDE = {"circle": math.pi / 4, "square": 1.0, "triangle": math.sqrt(3) / 4}
#: Sides tried for a template, as multiples of the side the object's coverage implies.
SIDE_SCALES = (0.92, 1.0, 1.08)
#: Gaussian blurs (standard deviation in pixels) tried on every template: an image decoded by an
#: image tokenizer has softer edges than the renderer draws, most of all on small objects.
TEMPLATE_BLURS = (0.0, 0.7, 1.2)
#: Pixels around a region's box that still count towards its coverage (its soft edge).
EDGE_MARGIN = 3


def coverage_map(pixels: np.ndarray, colour: tuple[int, int, int],
                 background: tuple[int, int, int]) -> np.ndarray:
    """How much of ``colour`` each pixel of an (H, W, 3) image shows over ``background``:
    the pixel's position on the line from the background to the colour, clipped to [0, 1]."""
    direction = np.asarray(background, np.float32) - np.asarray(colour, np.float32)
    along = (np.asarray(background, np.float32) - pixels) @ direction / float(direction @ direction)
    return np.clip(along, 0.0, 1.0)


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return image
    radius = max(1, math.ceil(3 * sigma))
    offsets = np.arange(-radius, radius + 1, dtype=np.float32)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(image, radius)
    rows = sum(w * padded[:, i:i + image.shape[1]] for i, w in enumerate(kernel))
    return sum(w * rows[i:i + image.shape[0], :] for i, w in enumerate(kernel))


def _shape_coverage(shape: str, center: tuple[float, float], side: float, height: int, width: int) -> np.ndarray:
    """The (H, W) coverage of ``shape`` with ``side`` pixels drawn by the world's renderer at ``center``
    (x, y in pixels)."""
    obj = ShapeObject(shape, "red", (center[0] / width, center[1] / height),
                      min(1.0, max(side, 1.0) / min(width, height)))
    drawn = np.asarray(render_scene(Scene((obj,), "", "colors", background=(0, 0, 0)), width, height))
    return np.clip(drawn[..., 0].astype(np.float32) / COLOURS["red"][0], 0.0, 1.0)


def _centroid(coverage: np.ndarray) -> np.ndarray:
    """The (x, y) centre of mass of a coverage map, in pixels (pixel i spans [i, i + 1])."""
    rows, cols = np.indices(coverage.shape)
    mass = coverage.sum()
    return np.array([((cols + 0.5) * coverage).sum() / mass, ((rows + 0.5) * coverage).sum() / mass])


def _best_shape(coverage: np.ndarray) -> tuple[str, float]:
    """The shape whose drawing best explains ``coverage`` (one object's coverage in a window
    around it, zero elsewhere) and the soft intersection over union of the two.

    Each shape is drawn with the area the coverage implies (times `SIDE_SCALES`) at the position
    that gives it the same centre of mass, then softened by each of `TEMPLATE_BLURS`.
    """
    height, width = coverage.shape
    mass = float(coverage.sum())
    centre = _centroid(coverage)
    best_shape, best_score = "", 0.0
    for shape in SHAPES:
        for scale in SIDE_SCALES:
            side = scale * math.sqrt(mass / AREA_PER_SQUARED_SIDE[shape])
            drawn = _shape_coverage(shape, tuple(centre), side, height, width)
            if drawn.sum() > 0:  # move it so its centre of mass (not its box centre) lies on the object's
                drawn = _shape_coverage(shape, tuple(2 * centre - _centroid(drawn)), side, height, width)
            for sigma in TEMPLATE_BLURS:
                template = _gaussian_blur(drawn, sigma)
                union = np.maximum(coverage, template).sum()
                score = float(np.minimum(coverage, template).sum() / union) if union else 0.0
                if score > best_score:
                    best_shape, best_score = shape, score
    return best_shape, best_score


def detect_shapes(image: "Image.Image | np.ndarray", config: DetectorConfig | None = None,
                  background: tuple[int, int, int] = (255, 255, 255)) -> list[Detection]:
    """The objects in ``image``, best score first.

    Args:
        image: a PIL image or an (H, W, 3) uint8 array (any other dtype is refused with a ValueError).
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
        regions = [r for r in _regions(foreground & close & (labels == index)) if len(r) >= min_area]
        if not regions:
            continue
        coverage = coverage_map(pixels, tuple(palette[index]), background)
        for region in regions:
            mask = np.zeros((height, width), bool)
            mask[region[:, 0], region[:, 1]] = True
            top, left = (int(v) for v in region.min(0))
            bottom, right = (int(v) + 1 for v in region.max(0))
            # The region's box and soft edge, without other objects' pixels.
            rows = slice(max(0, top - EDGE_MARGIN), min(height, bottom + EDGE_MARGIN))
            cols = slice(max(0, left - EDGE_MARGIN), min(width, right + EDGE_MARGIN))
            own = ~(foreground[rows, cols] & ~mask[rows, cols])
            best_shape, best_score = _best_shape(coverage[rows, cols] * own)
            if best_score < config.min_score:
                continue
            center = ((left + right) / 2 / width, (top + bottom) / 2 / height)
            detections.append(Detection(best_shape, colour, center, (left, top, right, bottom), len(region),
                                        best_score))
    return sorted(detections, key=lambda d: -d.score)
