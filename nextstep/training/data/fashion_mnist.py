"""Fashion-MNIST (70,000 grey 28x28 product photos, 10 classes) with templated captions.

Reads the IDX files of the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``); ``make data`` installs it.
"""

from __future__ import annotations

import functools
import gzip
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from nextstep.config import Config, require
from nextstep.training.data.base import ImageTextDataset, ImageTextSample
from nextstep.training.data.loader import mix_seed
from nextstep.training.data.registry import register_dataset

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
               "ankle boot")
TEMPLATES = (
    "a photo of a {name}",
    "a {name}",
    "a black and white photo of a {name}",
    "a grey picture of a {name} on a black background",
    "a small photo of a {name}",
)
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def _read_idx(path: Path, offset: int, kind: str) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(
            f"Fashion-MNIST needs {path} from the Debian package 'dataset-fashion-mnist', found nothing; "
            "run `make data` (or `apt-get install -y dataset-fashion-mnist`)"
        )
    with gzip.open(path, "rb") as handle:
        data = np.frombuffer(handle.read(), dtype=np.uint8)
    magic = int.from_bytes(data[:4].tobytes(), "big")
    expected = 0x803 if kind == "images" else 0x801
    if magic != expected:
        raise ValueError(f"{path} is not an IDX {kind} file (magic {magic:#x}, expected {expected:#x})")
    return data[offset:]


@functools.lru_cache(maxsize=2)
def load_arrays(split: str, directory: Path = DATA_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) of ``split`` (``train`` or ``test``)."""
    images_name, labels_name = _FILES[split]
    images = _read_idx(directory / images_name, 16, "images").reshape(-1, 28, 28)
    labels = _read_idx(directory / labels_name, 8, "labels")
    if len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels")
    return images, labels


@dataclass
class FashionMNISTConfig(Config):
    """Fashion-MNIST as an image-caption dataset.

    Args:
        split: ``train`` (60,000) or ``test`` (10,000).
        size: image side in pixels (the 28x28 originals are resized).
        templates: caption templates with a ``{name}`` slot; each sample's
            template is fixed by its index.
        limit: keep only the first ``limit`` samples (0 keeps all).
    """

    split: str = "train"
    size: int = 32
    templates: tuple[str, ...] = TEMPLATES
    limit: int = 0

    def validate(self) -> None:
        require(self.split in _FILES, "split", self.split, f"one of {list(_FILES)}")
        require(self.size >= 8, "size", self.size, ">= 8")
        require(len(self.templates) > 0 and all("{name}" in t for t in self.templates), "templates",
                self.templates, "a non-empty list of strings with a '{name}' slot")
        require(self.limit >= 0, "limit", self.limit, ">= 0")


@register_dataset("fashion_mnist")
class FashionMNISTDataset(ImageTextDataset):
    """Fashion-MNIST images (grey, as RGB) with captions such as "a photo of a sneaker"."""

    config_class = FashionMNISTConfig

    def __init__(self, config: FashionMNISTConfig | None = None):
        self.config = config or FashionMNISTConfig()
        self.images, self.labels = load_arrays(self.config.split)
        if self.config.limit:
            self.images, self.labels = self.images[:self.config.limit], self.labels[:self.config.limit]

    def __len__(self) -> int:
        return len(self.labels)

    def caption(self, index: int) -> str:
        templates = self.config.templates
        template = templates[mix_seed("fashion-mnist", index) % len(templates)]
        text = template.format(name=CLASS_NAMES[int(self.labels[index])])
        return re.sub(r"\ba (?=[aeiou])", "an ", text)

    def load(self, index: int) -> ImageTextSample:
        image = Image.fromarray(np.ascontiguousarray(self.images[index])).convert("RGB")
        size = self.config.size
        if size != 28:
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        return ImageTextSample(key=f"fashion_mnist/{self.config.split}/{index}", caption=self.caption(index),
                               image=image, metadata={"label": int(self.labels[index]),
                                                      "class": CLASS_NAMES[int(self.labels[index])]})

    def image_size(self, index: int) -> tuple[int, int]:
        return (self.config.size, self.config.size)
