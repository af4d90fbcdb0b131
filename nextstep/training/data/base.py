"""What datasets hand to the training loop: samples, batches and the dataset interface.

Legend: B batch, H/W pixels, N image tokens per image, D token dim.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image


class CorruptSampleError(Exception):
    """A sample could not be read (broken image file, bad tar member).

    The loader skips such samples with a warning and counts them; the run stops
    once the count passes the allowed fraction.

    Args:
        key: the file or sample that failed.
        reason: what went wrong.
    """

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


class DataQualityError(RuntimeError):
    """Too many unreadable samples: training on what is left would be misleading."""


@dataclass
class ImageTextSample:
    """One image-caption pair.

    Attributes:
        key: a stable name (file path or dataset index) for messages and logs.
        caption: the text.
        image: an RGB image, or None when ``tokens`` hold the cached image.
        tokens: cached image tokens, shape (N, D), or None.
        grid: token grid (h, w) of ``tokens``.
        source_image: for editing samples, the image to be edited.
        source_tokens: cached tokens of ``source_image``, shape (N_src, D).
        source_grid: token grid of ``source_tokens``.
        rejected_image: for preference samples, an image the caption describes
            worse than ``image`` (``image`` is the preferred one).
        metadata: dataset-specific ground truth (JSON-serialisable).
    """

    key: str
    caption: str
    image: Image.Image | None = None
    tokens: torch.Tensor | None = None
    grid: tuple[int, int] | None = None
    source_image: Image.Image | None = None
    source_tokens: torch.Tensor | None = None
    source_grid: tuple[int, int] | None = None
    rejected_image: Image.Image | None = None
    metadata: dict[str, Any] | None = None


@dataclass
class ImageTextBatch:
    """A batch of samples that share one image size (one aspect-ratio bucket).

    Attributes:
        keys: B sample keys.
        captions: B texts (instructions for editing batches).
        images: (B, 3, H, W) float32 in [-1, 1], or None when ``tokens`` are given.
        tokens: (B, N, D) cached image tokens, or None.
        grid: token grid (h, w) of ``tokens``.
        source_images: (B, 3, H', W') images to be edited, for editing batches.
        source_tokens: (B, N', D) cached source tokens.
        source_grid: token grid of ``source_tokens``.
        rejected_images: (B, 3, H, W) the less preferred image of each preference pair
            (``images`` holds the preferred ones), or None.
        bad_keys: samples that were unreadable and replaced while building the batch.
        attempted: how many samples were read, good and bad.
        epoch: the pass over the data its samples were read in, for loaders whose
            position in the data does not follow from the step (streams; the
            latest pass among its samples); None where it does.
    """

    keys: list[str]
    captions: list[str]
    images: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    grid: tuple[int, int] | None = None
    source_images: torch.Tensor | None = None
    source_tokens: torch.Tensor | None = None
    source_grid: tuple[int, int] | None = None
    rejected_images: torch.Tensor | None = None
    bad_keys: list[str] = field(default_factory=list)
    attempted: int = 0
    epoch: int | None = None

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def is_editing(self) -> bool:
        return self.source_images is not None or self.source_tokens is not None

    @property
    def is_preference(self) -> bool:
        return self.rejected_images is not None


#: What the samples of a dataset hold (`ImageTextDataset.sample_kind`): an image and its caption, with the
#: source image of an edit too, or with a rejected image beside the chosen one.
SAMPLE_KINDS = ("text_to_image", "editing", "preference")


def sample_kind_of(dataset) -> str:
    """The `SAMPLE_KINDS` entry of ``dataset``: its ``sample_kind``, text-to-image for a dataset that names none."""
    return getattr(dataset, "sample_kind", "text_to_image")


#: How many samples, spread over a dataset, `ImageTextDataset.content_fingerprint` digests by default.
FINGERPRINT_SAMPLES = 8


class ImageTextDataset(ABC):
    """A map-style dataset of image-caption pairs.

    Implement `__len__`, `load` and `image_size`; the loader uses `image_size`
    (which must be cheap: a header read or a constant) to put every index into
    an aspect-ratio bucket before any image is decoded.

    Attributes:
        sample_kind: one of `SAMPLE_KINDS`: what every sample holds (a batch holds
            samples of one kind, so datasets of different kinds are not mixed).
    """

    sample_kind: str = "text_to_image"

    @abstractmethod
    def __len__(self) -> int:
        """Number of samples."""

    @abstractmethod
    def load(self, index: int) -> ImageTextSample:
        """Sample ``index``; raise `CorruptSampleError` if it cannot be read."""

    @abstractmethod
    def image_size(self, index: int) -> tuple[int, int]:
        """(width, height) in pixels of sample ``index``'s image, without decoding it."""

    def caption(self, index: int) -> str:
        """The caption of sample ``index`` (by default from `load`; datasets that know it
        without reading the image override this)."""
        return self.load(index).caption

    def describe(self) -> str:
        """One line for logs."""
        return f"{type(self).__name__} ({len(self)} samples)"

    def content_fingerprint(self) -> str:
        """A digest of what the dataset serves, so that a latent cache built from other contents is refused:
        by default of `FINGERPRINT_SAMPLES` samples spread over it (image pixels and caption), which a
        changed generator, font or data file changes; datasets read from files a user may change
        digest every file instead (`FolderDataset`); "" for an empty dataset."""
        digest = hashlib.sha256()
        count = len(self)
        for index in sorted({index * count // FINGERPRINT_SAMPLES for index in range(FINGERPRINT_SAMPLES)}
                            if count else set()):
            try:
                sample = self.load(index)
            except CorruptSampleError as error:
                digest.update(f"{index}\0unreadable\0{error.reason}\n".encode())
                continue
            image = sample.image
            digest.update(f"{index}\0{sample.caption}\0".encode())
            if image is not None:
                digest.update(f"{image.mode}\0{image.size}\0".encode())
                digest.update(image.tobytes())
        return digest.hexdigest()[:16] if count else ""

    def check_buckets(self, buckets) -> None:
        """Raise ``ValueError`` when samples of a fixed size (cached tokens) could not be trained with
        ``buckets`` (`nextstep.training.data.buckets.AspectRatioBuckets`); by default images fit any."""
