"""Preference pairs: a caption, an image it describes, and a near miss it does not.

Preference training (`nextstep.training.preference`) pushes the model towards
the first image and away from the second. Two sources:

- ``shapes_preferences``: a shapes scene and its near miss, one edit away from
  it where the caption is most often wrong: another shape, another colour, one
  object more or fewer, the colours of two objects swapped, the places of two
  objects swapped. The near miss is kept only when its caption is not among
  its true captions (`nextstep.training.data.shapes.captions.true_captions`).
- ``preference_manifest``: pairs listed in a JSONL file, for real data.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

from nextstep.config import Config, require
from nextstep.images import IMAGE_ERRORS, oriented_size
from nextstep.io import what_is_at
from nextstep.training.data.base import ImageTextDataset, ImageTextSample
from nextstep.training.data.folder import open_image
from nextstep.training.data.manifest import manifest_entries
from nextstep.training.data.registry import register_dataset
from nextstep.training.data.shapes.captions import true_captions
from nextstep.training.data.shapes.combinations import tag_of
from nextstep.training.data.shapes.metadata import COLOURS, SHAPES, Scene
from nextstep.training.data.shapes.render import render_scene
from nextstep.training.data.shapes.world import ShapesConfig, drawable_kinds, free_spot, sample_scene


def near_miss_scene(rng: random.Random, scene: Scene) -> Scene | None:
    """A scene one edit away from ``scene`` that its caption does not describe, or None if the draw failed.

    The near miss carries a true caption of its own (the first of them in sorted order).

    The edit follows what the caption states: a single object changes shape (or
    colour, when the caption names it); a count gains or loses one object (or,
    when it names a colour, one object changes colour); of two objects, one
    changes to the shape neither has, their colours swap (when the caption names
    them) or their places swap (when it states a relation).
    """
    objects = list(scene.objects)
    tag = tag_of(scene.kind)
    coloured = scene.kind in ("colors", "color_attr", "colour_counting", "colour_position")
    if tag in ("single_object", "colors"):
        (obj,) = objects
        if coloured:
            objects[0] = replace(obj, colour=rng.choice([c for c in COLOURS if c != obj.colour]))
        else:
            objects[0] = replace(obj, shape=rng.choice([s for s in SHAPES if s != obj.shape]))
    elif tag == "counting":
        edits = ["remove", "add"] + (["recolour"] if coloured else [])
        edit = rng.choice(edits)
        if edit == "remove":
            del objects[rng.randrange(len(objects))]
        elif edit == "add":
            spot = free_spot(rng, objects, objects[0].size)
            if spot is None:
                return None
            objects.append(replace(objects[0], center=spot))
        else:
            which = rng.randrange(len(objects))
            objects[which] = replace(objects[which], colour=rng.choice(
                [c for c in COLOURS if c != objects[which].colour]))
    elif tag in ("two_object", "color_attr", "position"):
        first, second = objects
        edits = ["shape"] + (["colours"] if coloured else []) + (["places"] if tag == "position" else [])
        edit = rng.choice(edits)
        if edit == "shape":
            which = rng.randrange(2)
            (missing,) = [s for s in SHAPES if s not in (first.shape, second.shape)]
            objects[which] = replace(objects[which], shape=missing)
        elif edit == "colours":
            objects = [replace(first, colour=second.colour), replace(second, colour=first.colour)]
        else:
            objects = [replace(first, center=second.center), replace(second, center=first.center)]
    else:
        raise ValueError(f"no near misses for scene kind {scene.kind!r}")
    truths = true_captions(Scene(tuple(objects), "", scene.kind, scene.relation, scene.background)) - {""}
    if scene.caption in truths or not truths:
        return None
    # The near miss carries a caption of its own (the first of its true ones in sorted order).
    return Scene(tuple(objects), min(truths), scene.kind, scene.relation, scene.background)


@dataclass
class ShapesPreferencesConfig(ShapesConfig):
    """Shapes scenes and their near misses as preference pairs; the fields are those of
    `nextstep.training.data.shapes.world.ShapesConfig` (the scenes are drawn from
    ``combinations``, training's own by default)."""


@register_dataset("shapes_preferences")
class ShapesPreferencesDataset(ImageTextDataset):
    """A shapes scene (preferred) and a near miss of it (rejected) under the scene's caption;
    ``metadata`` holds both `Scene` dicts."""

    sample_kind = "preference"

    config_class = ShapesPreferencesConfig

    def __init__(self, config: ShapesPreferencesConfig | None = None):
        self.config = config or ShapesPreferencesConfig()
        self.kinds = drawable_kinds(self.config.kinds, self.config.combinations)

    def __len__(self) -> int:
        return self.config.num_samples

    def pair(self, index: int) -> tuple[Scene, Scene]:
        """Ground truth of sample ``index``: (preferred scene, rejected scene)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index must be in [0, {len(self)}), found {index}")
        c = self.config
        rng = random.Random(f"shapes-preference:{c.seed}:{c.split}:{index}")
        while True:
            scene = sample_scene(rng, self.kinds[rng.randrange(len(self.kinds))], c.max_count,
                                 combinations=c.combinations)
            miss = near_miss_scene(rng, scene)
            if miss is not None:
                return scene, miss

    def load(self, index: int) -> ImageTextSample:
        scene, miss = self.pair(index)
        size = self.config.size
        return ImageTextSample(key=f"shapes_preferences/{self.config.split}/{index}", caption=scene.caption,
                               image=render_scene(scene, size, size), rejected_image=render_scene(miss, size, size),
                               metadata={"chosen": scene.to_dict(), "rejected": miss.to_dict()})

    def caption(self, index: int) -> str:
        return self.pair(index)[0].caption

    def image_size(self, index: int) -> tuple[int, int]:
        return (self.config.size, self.config.size)


@dataclass
class PreferenceManifestConfig(Config):
    """A JSONL file of preference pairs.

    Args:
        path: the manifest; one ``{"caption": text, "chosen": path, "rejected": path}``
            per line, paths relative to the manifest's folder.
    """

    path: str = ""

    def validate(self) -> None:
        require(bool(self.path), "path", self.path, "a JSONL manifest of preference pairs")


@register_dataset("preference_manifest")
class PreferenceManifestDataset(ImageTextDataset):
    """Preference pairs listed in a JSONL manifest."""

    sample_kind = "preference"

    config_class = PreferenceManifestConfig

    def __init__(self, config: PreferenceManifestConfig | None = None):
        self.config = config or PreferenceManifestConfig()
        manifest = Path(self.config.path)
        if not manifest.is_file():
            raise FileNotFoundError(f"expected a preference manifest at {manifest}, found {what_is_at(manifest)} "
                                    "(`nextstep preference-pairs MODEL FOLDER` writes FOLDER/pairs.jsonl from a "
                                    "model's samples)")
        self.records: list[tuple[str, Path, Path]] = []
        self.sizes: list[tuple[int, int]] = []
        for number, entry in manifest_entries(manifest, ("caption", "chosen", "rejected")):
            chosen, rejected = manifest.parent / entry["chosen"], manifest.parent / entry["rejected"]
            try:
                with Image.open(chosen) as image:
                    size = oriented_size(image)
            except IMAGE_ERRORS as error:
                raise ValueError(f"{manifest} line {number}: cannot read {chosen}: {error}") from None
            self.records.append((entry["caption"].strip(), chosen, rejected))
            self.sizes.append(size)

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> ImageTextSample:
        caption, chosen, rejected = self.records[index]
        return ImageTextSample(key=str(chosen), caption=caption, image=open_image(chosen),
                               rejected_image=open_image(rejected))

    def caption(self, index: int) -> str:
        return self.records[index][0]

    def image_size(self, index: int) -> tuple[int, int]:
        return self.sizes[index]
