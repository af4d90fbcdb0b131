"""Training data: image-caption, editing and preference datasets, aspect-ratio buckets, loaders, latent caches."""

from nextstep.training.data.base import (
    CorruptSampleError,
    DataQualityError,
    ImageTextBatch,
    ImageTextDataset,
    ImageTextSample,
)
from nextstep.training.data.buckets import AspectRatioBuckets, resize_and_crop, token_grids
from nextstep.training.data.editing import EditingManifestDataset, ShapesEditingDataset
from nextstep.training.data.emoji import EmojiConfig, EmojiDataset
from nextstep.training.data.fashion_mnist import FashionMNISTConfig, FashionMNISTDataset
from nextstep.training.data.folder import ImageFolderConfig, ImageFolderDataset
from nextstep.training.data.latent_cache import LatentCacheDataset, build_latent_cache
from nextstep.training.data.loader import BatchLayout, BatchPlan, TrainingBatches, collate_samples
from nextstep.training.data.mixture import ConcatImageTextDataset
from nextstep.training.data.preferences import PreferenceManifestDataset, ShapesPreferencesDataset, near_miss_scene
from nextstep.training.data.quality import BadSampleTracker
from nextstep.training.data.registry import build_dataset, dataset_names, register_dataset
from nextstep.training.data.shapes import Scene, ShapeObject, ShapesConfig, ShapesDataset
from nextstep.training.data.source import DataConfig, TrainingData, build_training_data
from nextstep.training.data.webdataset import WebDataset, WebDatasetConfig

__all__ = [
    "AspectRatioBuckets",
    "BadSampleTracker",
    "BatchLayout",
    "BatchPlan",
    "ConcatImageTextDataset",
    "CorruptSampleError",
    "DataConfig",
    "DataQualityError",
    "EditingManifestDataset",
    "EmojiConfig",
    "EmojiDataset",
    "FashionMNISTConfig",
    "FashionMNISTDataset",
    "ImageFolderConfig",
    "ImageFolderDataset",
    "ImageTextBatch",
    "ImageTextDataset",
    "ImageTextSample",
    "LatentCacheDataset",
    "PreferenceManifestDataset",
    "Scene",
    "ShapeObject",
    "ShapesConfig",
    "ShapesDataset",
    "ShapesEditingDataset",
    "ShapesPreferencesDataset",
    "TrainingBatches",
    "TrainingData",
    "WebDataset",
    "WebDatasetConfig",
    "build_dataset",
    "build_latent_cache",
    "build_training_data",
    "collate_samples",
    "dataset_names",
    "near_miss_scene",
    "register_dataset",
    "resize_and_crop",
    "token_grids",
]
