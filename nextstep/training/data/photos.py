"""Random crops of the offline photo bank, for training image tokenizers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nextstep.config import Config, require
from nextstep.evaluation.photo_bank import load_photos, random_crop, split_photos
from nextstep.training.data.base import ImageTextDataset, ImageTextSample
from nextstep.training.data.loader import mix_seed
from nextstep.training.data.registry import register_dataset


@dataclass
class PhotoCropsConfig(Config):
    """Args:
    num_samples: crops per epoch (sample ``i`` is always the same crop).
    size: crop side in pixels.
    split: ``train`` or ``held_out`` photos of `nextstep.evaluation.photo_bank.split_photos`.
    seed: seed of the crop positions and scales.
    min_scale: smallest photo-pixels-per-crop-pixel ratio.
    max_scale: largest ratio (crops cover up to ``size * max_scale`` photo pixels).
    """

    num_samples: int = 20000
    size: int = 64
    split: str = "train"
    seed: int = 0
    min_scale: float = 1.0
    max_scale: float = 4.0

    def validate(self) -> None:
        require(self.num_samples >= 1, "num_samples", self.num_samples, ">= 1")
        require(self.size >= 8, "size", self.size, ">= 8")
        require(self.split in ("train", "held_out"), "split", self.split, "'train' or 'held_out'")
        require(0 < self.min_scale <= self.max_scale, "min_scale", self.min_scale,
                f"positive and <= max_scale={self.max_scale}")


@register_dataset("photo_crops")
class PhotoCropsDataset(ImageTextDataset):
    """Square crops of real photos with empty captions (tokenizer training data)."""

    config_class = PhotoCropsConfig

    def __init__(self, config: PhotoCropsConfig | None = None):
        self.config = config or PhotoCropsConfig()
        train, held_out = split_photos(load_photos())
        self.photos = train if self.config.split == "train" else held_out
        if not self.photos:
            raise ValueError(f"the photo bank has no {self.config.split!r} photos")

    def __len__(self) -> int:
        return self.config.num_samples

    def image_size(self, index: int) -> tuple[int, int]:
        return self.config.size, self.config.size

    def load(self, index: int) -> ImageTextSample:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} outside 0..{len(self) - 1}")
        rng = np.random.default_rng(mix_seed(self.config.seed, "photo_crop", index))
        crop = random_crop(self.photos, self.config.size, rng, (self.config.min_scale, self.config.max_scale))
        return ImageTextSample(key=f"photo_crops/{self.config.split}/{index}", caption="", image=crop)

    def caption(self, index: int) -> str:
        """Every crop's caption is empty."""
        return ""

    def describe(self) -> str:
        return f"photo crops ({len(self)} of {self.config.size}px from {len(self.photos)} {self.config.split} photos)"
