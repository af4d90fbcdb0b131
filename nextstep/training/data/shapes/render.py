"""Draw a `Scene` with Pillow (anti-aliased by drawing larger and downsampling)."""

from __future__ import annotations

import math

from PIL import Image, ImageDraw

from nextstep.training.data.shapes.metadata import COLOURS, Scene, ShapeObject


def _polygon(obj: ShapeObject, width: int, height: int) -> list[tuple[float, float]]:
    left, top, right, bottom = obj.bbox(width, height)
    if obj.shape == "square":
        return [(left, top), (right, top), (right, bottom), (left, bottom)]
    if obj.shape == "triangle":
        # Equilateral, pointing up, inscribed in the box's width and centred on its centre.
        cx, cy = (left + right) / 2, (top + bottom) / 2
        side = right - left
        tri_height = side * math.sqrt(3) / 2
        return [(cx, cy - tri_height / 2), (right, cy + tri_height / 2), (left, cy + tri_height / 2)]
    raise ValueError(f"no polygon for shape {obj.shape!r}")


def render_scene(scene: Scene, width: int, height: int, supersample: int = 4) -> Image.Image:
    """An RGB image of ``scene`` at ``width`` x ``height`` pixels.

    Args:
        scene: what to draw.
        width: output width in pixels.
        height: output height in pixels.
        supersample: drawing scale before the downsampling that smooths edges (1 disables it).
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, found {width}x{height}")
    big_w, big_h = width * supersample, height * supersample
    canvas = Image.new("RGB", (big_w, big_h), tuple(scene.background))
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse(obj.bbox(big_w, big_h), fill=fill)
        else:
            draw.polygon(_polygon(obj, big_w, big_h), fill=fill)
    if supersample == 1:
        return canvas
    return canvas.resize((width, height), Image.Resampling.LANCZOS)
