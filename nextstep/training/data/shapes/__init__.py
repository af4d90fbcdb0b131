"""A synthetic world of coloured shapes with exact ground truth, for training and evaluation."""

from nextstep.training.data.shapes.metadata import (
    COLOURS,
    RELATIONS,
    SCENE_KINDS,
    SHAPES,
    Relation,
    Scene,
    ShapeObject,
)
from nextstep.training.data.shapes.render import render_scene
from nextstep.training.data.shapes.world import (
    ShapesConfig,
    ShapesDataset,
    relation_holds,
    sample_scene,
)

__all__ = [
    "COLOURS",
    "RELATIONS",
    "SCENE_KINDS",
    "SHAPES",
    "Relation",
    "Scene",
    "ShapeObject",
    "ShapesConfig",
    "ShapesDataset",
    "relation_holds",
    "render_scene",
    "sample_scene",
]
