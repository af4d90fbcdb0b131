"""Models that ship inside the package, loadable by name with no download.

``nextstep generate "a red circle" --model emoji-shapes-64`` (the CLI's default
model) reads ``nextstep/pretrained/emoji-shapes-64/``. `recipes/emoji_shapes_64.json`
reproduces it; docs/training.md gives its measured wall time.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

FOLDER = Path(__file__).resolve().parent

#: The model the CLI uses when none is named.
DEFAULT_MODEL = "emoji-shapes-64"


def bundled_models() -> list[str]:
    """Names of the shipped models (folders holding a ``config.json``)."""
    return sorted(p.name for p in FOLDER.iterdir() if (p / "config.json").is_file())


def bundled_model_path(name: str) -> Path | None:
    """The folder of shipped model ``name``, or None if no shipped model has that name."""
    path = FOLDER / name
    return path if name in bundled_models() else None


#: The files whose size and time `model_fingerprint` reads besides ``config.json``: weights, in any layout.
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def model_fingerprint(name_or_path: str) -> str | None:
    """What tells one model that a name loads from another without reading its weights: a digest of the
    folder's ``config.json`` and of each weight file's path, size and modification time (a model saved
    again, or copied, gets another; outputs written into the folder do not count). None for a preset's
    name, built from its name and seed alone."""
    directory = model_directory(name_or_path)
    if directory is None:
        return None
    digest = hashlib.sha256()
    config = directory / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    for path in sorted(p for p in directory.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file()):
        status = path.stat()
        digest.update(f"{path.relative_to(directory).as_posix()}\0{status.st_size}\0{status.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def model_directory(name_or_path: str) -> Path | None:
    """The folder a model name refers to: an existing directory that holds a model; else a shipped model's;
    else None for a preset's name (built from the preset, whatever folder of that name is in the working
    directory); else an existing directory (which loading then names as holding no model); else None."""
    from nextstep.registry import model_names

    path = Path(name_or_path)
    if path.is_dir() and (path / "config.json").is_file():
        return path
    shipped = bundled_model_path(name_or_path)
    if shipped is not None or name_or_path in model_names():
        return shipped
    return path if path.is_dir() else None
