"""Editing samples: a source image, an instruction, and the edited target image.

Two sources: a JSONL manifest of real pairs, and the shapes world, whose edits
(recolour, remove, add, move an object) come with exact before/after ground truth.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

from nextstep.config import Config, require
from nextstep.images import IMAGE_ERRORS, oriented_size
from nextstep.training.data.base import ImageTextDataset, ImageTextSample
from nextstep.training.data.folder import open_image
from nextstep.training.data.manifest import manifest_entries
from nextstep.training.data.registry import register_dataset
from nextstep.training.data.shapes.metadata import COLOURS, SHAPES, Scene, ShapeObject
from nextstep.training.data.shapes.render import render_scene
from nextstep.training.data.shapes.world import boxes_overlap, free_spot, object_phrase, sample_scene

EDIT_KINDS = ("recolour", "remove", "add", "move")


@dataclass
class EditingManifestConfig(Config):
    """A JSONL file of editing pairs.

    Args:
        path: the manifest; one ``{"source": path, "instruction": text, "target": path}``
            per line, paths relative to the manifest's folder.
    """

    path: str = ""

    def validate(self) -> None:
        require(bool(self.path), "path", self.path, "a JSONL manifest of editing pairs")


@register_dataset("editing_manifest")
class EditingManifestDataset(ImageTextDataset):
    """Editing pairs listed in a JSONL manifest (the caption is the instruction)."""

    sample_kind = "editing"

    config_class = EditingManifestConfig

    def __init__(self, config: EditingManifestConfig | None = None):
        self.config = config or EditingManifestConfig()
        manifest = Path(self.config.path)
        if not manifest.is_file():
            raise FileNotFoundError(f"expected an editing manifest at {manifest}, found nothing")
        self.records: list[tuple[Path, str, Path]] = []
        self.sizes: list[tuple[int, int]] = []
        self.known_bad: list[str] = []
        self.scanned = 0
        for number, entry in manifest_entries(manifest, ("source", "instruction", "target")):
            self.scanned += 1
            source, target = manifest.parent / entry["source"], manifest.parent / entry["target"]
            try:
                with Image.open(target) as image:
                    size = oriented_size(image)
            except IMAGE_ERRORS as error:
                self.known_bad.append(f"{target} (unreadable header: {error})")
                continue
            self.records.append((source, entry["instruction"].strip(), target))
            self.sizes.append(size)

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> ImageTextSample:
        source, instruction, target = self.records[index]
        return ImageTextSample(key=str(target), caption=instruction, image=open_image(target),
                               source_image=open_image(source))

    def caption(self, index: int) -> str:
        """Sample ``index``'s instruction, without opening its images."""
        return self.records[index][1]

    def image_size(self, index: int) -> tuple[int, int]:
        return self.sizes[index]


def sample_edit(rng: random.Random, kind: str) -> tuple[Scene, str, Scene] | None:
    """A (source scene, instruction, target scene) triple, or None if the draw failed.

    Args:
        rng: the random source.
        kind: ``recolour``, ``remove``, ``add`` or ``move``.
    """
    source = sample_scene(rng, rng.choice(("colors", "color_attr")))
    objects = list(source.objects)
    which = rng.randrange(len(objects))
    obj = objects[which]
    if kind == "recolour":
        colour = rng.choice([c for c in COLOURS if c != obj.colour])
        objects[which] = replace(obj, colour=colour)
        instruction = f"make the {obj.colour} {obj.shape} {colour}"
    elif kind == "remove":
        if len(objects) < 2:
            return None
        del objects[which]
        instruction = f"remove the {obj.colour} {obj.shape}"
    elif kind == "add":
        size = rng.uniform(0.2, 0.3)
        spot = free_spot(rng, objects, size)
        if spot is None:
            return None
        new = ShapeObject(rng.choice(SHAPES), rng.choice(list(COLOURS)), spot, size)
        objects.append(new)
        instruction = f"add {object_phrase(new)}"
    elif kind == "move":
        others = [o for i, o in enumerate(objects) if i != which]
        side = rng.choice(("left", "right"))
        half = obj.size / 2
        x = rng.uniform(half + 0.02, 0.35) if side == "left" else rng.uniform(0.65, 1 - half - 0.02)
        if (side == "left" and x > obj.center[0] - 0.1) or (side == "right" and x < obj.center[0] + 0.1):
            return None
        moved = replace(obj, center=(x, obj.center[1]))
        box = (x - half, moved.center[1] - half, x + half, moved.center[1] + half)
        if boxes_overlap(box, [(o.center[0] - o.size / 2, o.center[1] - o.size / 2, o.center[0] + o.size / 2,
                            o.center[1] + o.size / 2) for o in others], margin=0.03):
            return None
        objects[which] = moved
        instruction = f"move the {obj.colour} {obj.shape} to the {side}"
    else:
        raise ValueError(f"edit kind must be one of {list(EDIT_KINDS)}, found {kind!r}")
    target = Scene(tuple(objects), instruction, "colors" if len(objects) == 1 else "color_attr")
    return source, instruction, target


@dataclass
class ShapesEditingConfig(Config):
    """Shapes-world edits as a dataset.

    Args:
        num_samples: length of the dataset.
        size: image side in pixels.
        seed: base seed.
        split: ``train`` or ``test``.
        kinds: edit kinds to mix.
    """

    num_samples: int = 10000
    size: int = 64
    seed: int = 0
    split: str = "train"
    kinds: tuple[str, ...] = EDIT_KINDS

    def validate(self) -> None:
        require(self.num_samples >= 1, "num_samples", self.num_samples, ">= 1")
        require(self.size >= 8, "size", self.size, ">= 8")
        require(self.split in ("train", "test"), "split", self.split, "'train' or 'test'")
        require(len(self.kinds) > 0 and all(k in EDIT_KINDS for k in self.kinds), "kinds", self.kinds,
                f"a non-empty subset of {list(EDIT_KINDS)}")


@register_dataset("shapes_editing")
class ShapesEditingDataset(ImageTextDataset):
    """Shapes scenes before and after an edit; ``metadata`` holds both `Scene` dicts."""

    sample_kind = "editing"

    config_class = ShapesEditingConfig

    def __init__(self, config: ShapesEditingConfig | None = None):
        self.config = config or ShapesEditingConfig()

    def __len__(self) -> int:
        return self.config.num_samples

    def edit(self, index: int) -> tuple[Scene, str, Scene]:
        """Ground truth of sample ``index``: (source scene, instruction, target scene)."""
        c = self.config
        rng = random.Random(f"shapes-edit:{c.seed}:{c.split}:{index}")
        while True:
            result = sample_edit(rng, c.kinds[rng.randrange(len(c.kinds))])
            if result is not None:
                return result

    def load(self, index: int) -> ImageTextSample:
        source, instruction, target = self.edit(index)
        size = self.config.size
        return ImageTextSample(
            key=f"shapes_editing/{self.config.split}/{index}", caption=instruction,
            image=render_scene(target, size, size), source_image=render_scene(source, size, size),
            metadata={"source": source.to_dict(), "target": target.to_dict()},
        )

    def image_size(self, index: int) -> tuple[int, int]:
        return (self.config.size, self.config.size)
