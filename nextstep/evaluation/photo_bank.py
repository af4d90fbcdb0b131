"""Real photographs that work offline, as fixed-seed crops.

Sources, in order: scikit-image's sample photos, scikit-learn's two sample
images, and Debian's ``mate-backgrounds`` (nature) and ``plasma-workspace-wallpapers``
wallpapers when installed (``make photos``). Each photo
belongs to exactly one split (by name), so held-out crops never come from a
training photo.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nextstep.config import require_count

SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina",
                  "immunohistochemistry")
WALLPAPER_DIRS = (Path("/usr/share/backgrounds/mate/nature"),)
#: KDE Plasma wallpapers: one folder per wallpaper, each image in several resolutions.
PLASMA_WALLPAPERS = Path("/usr/share/wallpapers")
#: Photos always held out for evaluation.
HELD_OUT = ("astronaut", "coffee", "chelsea", "sklearn_china")


@dataclass
class Photo:
    name: str
    image: Image.Image


def _skimage_photos() -> list[Photo]:
    try:
        import skimage.data
    except ImportError:
        return []
    photos = []
    for name in SKIMAGE_PHOTOS:
        try:
            photos.append(Photo(name, Image.fromarray(getattr(skimage.data, name)()).convert("RGB")))
        except Exception:  # a sample missing from this scikit-image version
            continue
    return photos


def _sklearn_photos() -> list[Photo]:
    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        return []
    bunch = load_sample_images()
    return [Photo(f"sklearn_{Path(f).stem}", Image.fromarray(a).convert("RGB"))
            for f, a in zip(bunch.filenames, bunch.images)]


def _wallpaper_files() -> list[tuple[str, Path]]:
    """(name, file) of every installed wallpaper; for Plasma ones, the largest rendition."""
    files = []
    for directory in WALLPAPER_DIRS:
        if directory.is_dir():
            files += [(path.stem, path) for path in sorted(directory.rglob("*"))
                      if path.suffix.lower() in (".jpg", ".jpeg", ".png")]
    if PLASMA_WALLPAPERS.is_dir():
        for folder in sorted(PLASMA_WALLPAPERS.glob("*/contents/images")):
            images = [p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
            if images:
                files.append((folder.parents[1].name, max(images, key=lambda p: p.stat().st_size)))
    return files


def _wallpapers(max_side: int = 1024) -> list[Photo]:
    photos = []
    for name, path in _wallpaper_files():
        image = Image.open(path).convert("RGB")
        image.thumbnail((max_side, max_side), Image.BICUBIC)
        photos.append(Photo(f"wallpaper_{name}", image))
    return photos


@functools.lru_cache(maxsize=1)
def _cached_photos() -> tuple[Photo, ...]:
    return tuple(sorted(_skimage_photos() + _sklearn_photos() + _wallpapers(), key=lambda p: p.name))


def load_photos() -> list[Photo]:
    """Every photo available offline, sorted by name.

    Raises:
        RuntimeError: if none is available (install ``scikit-image``).
    """
    photos = list(_cached_photos())
    if not photos:
        raise RuntimeError(
            "no photos available: install scikit-image (pip install scikit-image) and optionally "
            "scikit-learn and the Debian package mate-backgrounds"
        )
    return photos


def split_photos(photos: list[Photo]) -> tuple[list[Photo], list[Photo]]:
    """(train, held-out): `HELD_OUT` names plus every fifth wallpaper (by a name hash) are held out."""
    held, train = [], []
    for photo in photos:
        digest = int(hashlib.sha256(photo.name.encode()).hexdigest(), 16)
        is_held = photo.name in HELD_OUT or (photo.name.startswith("wallpaper_") and digest % 5 == 0)
        (held if is_held else train).append(photo)
    return train, held


def random_crop(photos: list[Photo], size: int, rng: np.random.Generator,
                scales: tuple[float, float] = (1.0, 4.0)) -> Image.Image:
    """One ``size`` x ``size`` crop from a random photo at a random scale, randomly mirrored.

    The crop covers ``size * s`` pixels of the photo (``s`` drawn log-uniformly from
    ``scales``, capped by the photo's size) and is resized to ``size`` with Lanczos
    filtering, so crops range from native detail to downscaled scenes.
    """
    if not photos:
        raise ValueError("expected at least one photo, found none")
    photo = photos[rng.integers(len(photos))].image
    width, height = photo.size
    largest = min(width, height) / size
    low, high = np.log(min(scales[0], largest)), np.log(min(scales[1], largest))
    side = int(round(size * float(np.exp(rng.uniform(low, high)))))
    left = int(rng.integers(0, width - side + 1))
    top = int(rng.integers(0, height - side + 1))
    crop = photo.crop((left, top, left + side, top + side))
    if side != size:
        crop = crop.resize((size, size), Image.LANCZOS)
    if rng.random() < 0.5:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    return crop


def random_crops(photos: list[Photo], count: int, size: int, *, seed: int = 0,
                 scales: tuple[float, float] = (1.0, 4.0)) -> torch.Tensor:
    """``count`` crops from `random_crop` under one seed.

    Returns:
        (count, 3, size, size) float32 in [-1, 1].

    Raises:
        ValueError: ``count`` or ``size`` below 1, or no photos.
    """
    require_count("count", count)
    require_count("size", size)
    rng = np.random.default_rng(seed)
    out = np.stack([np.asarray(random_crop(photos, size, rng, scales)) for _ in range(count)])
    return torch.from_numpy(out).permute(0, 3, 1, 2).float() / 127.5 - 1.0
