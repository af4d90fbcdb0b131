"""Images in a folder with captions in sidecar ``.txt`` files or in a JSONL manifest.

Layouts:

- sidecar: ``photos/cat.jpg`` + ``photos/cat.txt`` (the caption), searched recursively;
- manifest: a JSONL file, one ``{"image": "relative/path.jpg", "caption": "..."}``
  per line (optionally with ``"width"`` and ``"height"`` to skip reading headers);
  paths are relative to the manifest's folder.

File headers are read once when the dataset is built (for the aspect-ratio
buckets); files that cannot be opened are counted as bad there. Files whose
header is fine but whose pixels are broken are caught when loaded.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from nextstep.config import Config, require
from nextstep.images import IMAGE_ERRORS, oriented_size, to_rgb
from nextstep.training.data.base import CorruptSampleError, ImageTextDataset, ImageTextSample
from nextstep.training.data.manifest import manifest_entries
from nextstep.training.data.registry import register_dataset

logger = logging.getLogger("nextstep.training")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


def open_image(path: Path | str, data: bytes | None = None) -> Image.Image:
    """Decode an image fully into RGB; raise `CorruptSampleError` naming ``path`` if it is broken."""
    import io

    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as image:
            image.load()
            return to_rgb(image)
    except IMAGE_ERRORS as error:
        raise CorruptSampleError(str(path), f"unreadable image ({error})") from None


@dataclass
class ImageFolderConfig(Config):
    """Where the images and captions are.

    Args:
        path: the image folder (sidecar layout) or a JSONL manifest file.
        caption_extension: suffix of sidecar caption files.
        extensions: image file suffixes to pick up (sidecar layout).
    """

    path: str = ""
    caption_extension: str = ".txt"
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS

    def validate(self) -> None:
        require(bool(self.path), "path", self.path, "a folder of images or a JSONL manifest")
        require(self.caption_extension.startswith("."), "caption_extension", self.caption_extension,
                "a suffix starting with '.'")


@register_dataset("folder")
class ImageFolderDataset(ImageTextDataset):
    """Image-caption pairs from a folder (sidecar captions) or a JSONL manifest.

    Attributes:
        known_bad: files that could not be opened while scanning (excluded).
        scanned: how many files the scan looked at.
    """

    config_class = ImageFolderConfig

    def __init__(self, config: ImageFolderConfig | None = None):
        self.config = config or ImageFolderConfig()
        root = Path(self.config.path)
        if root.is_file():
            records = self._read_manifest(root)
        elif root.is_dir():
            records = self._read_sidecars(root)
        else:
            raise FileNotFoundError(f"expected an image folder or a JSONL manifest at {root}, found nothing")
        if not records:
            raise ValueError(f"found no images under {root} (extensions {list(self.config.extensions)})")
        self.paths: list[Path] = []
        self.captions: list[str] = []
        self.sizes: list[tuple[int, int]] = []
        self.known_bad: list[str] = []
        self.scanned = len(records)
        for path, caption, size in records:
            if size is None:
                try:
                    with Image.open(path) as image:
                        size = oriented_size(image)
                except IMAGE_ERRORS as error:
                    self.known_bad.append(f"{path} (unreadable header: {error})")
                    continue
            self.paths.append(path)
            self.captions.append(caption)
            self.sizes.append(size)
        for entry in self.known_bad:
            logger.warning("skipped unreadable image %s", entry)

    def content_fingerprint(self) -> str:
        """A digest of every sample's image file (name, size, modification time) and caption."""
        root = Path(self.config.path)
        base = root.parent if root.is_file() else root
        digest = hashlib.sha256()
        for path, caption in zip(self.paths, self.captions):
            stat = path.stat()
            # Relative to the dataset's folder (the cache stays valid when the folder moves); a manifest may
            # also name files elsewhere by their absolute paths.
            name = path.relative_to(base) if path.is_relative_to(base) else path
            digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\0{caption}\n".encode())
        return digest.hexdigest()[:16]

    def _read_sidecars(self, root: Path):
        extensions = {e.lower() for e in self.config.extensions}
        images = sorted(p for p in root.rglob("*") if p.suffix.lower() in extensions and p.is_file())
        records = []
        for image in images:
            caption_file = image.with_suffix(self.config.caption_extension)
            if not caption_file.is_file():
                raise ValueError(
                    f"image {image} has no caption: expected the file {caption_file} "
                    "(or list the images in a JSONL manifest with a 'caption' field)"
                )
            records.append((image, caption_file.read_text(encoding="utf-8-sig").strip(), None))
        return records

    def _read_manifest(self, manifest: Path):
        records = []
        base = manifest.parent
        for number, entry in manifest_entries(manifest):
            if not isinstance(entry.get("image"), str) or not entry["image"]:
                raise ValueError(f"{manifest} line {number}: expected an object with an 'image' path (a non-empty "
                                 f"string), found {entry!r}")
            image = base / entry["image"]
            if not isinstance(entry.get("caption"), str):
                raise ValueError(
                    f"{manifest} line {number}: image {image} has no caption "
                    f"(expected a string 'caption' field, found {entry.get('caption')!r})"
                )
            unknown = sorted(set(entry) - {"image", "caption", "width", "height"})
            if unknown:
                raise ValueError(f"{manifest} line {number}: unknown keys {unknown}; known: "
                                 "['caption', 'height', 'image', 'width']")
            records.append((image, entry["caption"].strip(), _manifest_size(manifest, number, entry)))
        return records

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> ImageTextSample:
        path = self.paths[index]
        return ImageTextSample(key=str(path), caption=self.captions[index], image=open_image(path))

    def caption(self, index: int) -> str:
        """Sample ``index``'s caption, without opening its image."""
        return self.captions[index]

    def image_size(self, index: int) -> tuple[int, int]:
        return self.sizes[index]


def _manifest_size(manifest: Path, number: int, entry: dict) -> tuple[int, int] | None:
    """The (width, height) a manifest line gives, both positive integers, or None when it gives neither."""
    given = [key for key in ("width", "height") if key in entry]
    if not given:
        return None
    values = [entry.get("width"), entry.get("height")]
    if len(given) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"{manifest} line {number}: 'width' and 'height' must be given together as positive "
                         f"integers (pixels), found width={entry.get('width')!r}, height={entry.get('height')!r}")
    return values[0], values[1]
