"""`DataConfig` and `TrainingData`: from a recipe's data section to the batches of one process."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable

from nextstep.config import Config, is_count, plain_data, require, require_count
from nextstep.training.data.base import ImageTextBatch
from nextstep.training.data.buckets import AspectRatioBuckets
from nextstep.training.data.loader import BatchLayout, TrainingBatches
from nextstep.training.data.mixture import ConcatImageTextDataset
from nextstep.training.data.registry import build_dataset, dataset_config


@dataclass
class DataConfig(Config):
    """The training data of a recipe.

    Args:
        datasets: dataset specs ``{"type": name, **fields}``; a spec of a map-style
            dataset may add ``"repeat": n`` to list it ``n`` times per epoch. Several
            map-style datasets are concatenated; a streaming one (``webdataset``)
            must be the only one.
        resolution: side in pixels of the square bucket.
        multi_aspect: bucket images by aspect ratio (NextStep-1's grids);
            False centre-crops everything to a square.
        grid_multiple: scale of the bucket grids (2 for NextStep-1's 512 px buckets).
        latent_cache: a folder of cached image tokens; built on first use, then
            batches come from it without running the image tokenizer.
    """

    datasets: tuple[dict, ...] = ()
    resolution: int = 64
    multi_aspect: bool = False
    grid_multiple: int = 1
    latent_cache: str = ""

    def __post_init__(self) -> None:
        # Specs as JSON holds them (tuples inside become lists), so that a spec read back equals it.
        if isinstance(self.datasets, (list, tuple)):
            self.datasets = tuple(plain_data(spec) for spec in self.datasets)
        super().__post_init__()

    def validate(self) -> None:
        require(len(self.datasets) > 0, "datasets", self.datasets, "at least one dataset spec")
        for number, spec in enumerate(self.datasets):
            require(isinstance(spec, dict), "datasets", spec, "a list of mappings")
            fields, repeat = split_repeat(spec)
            try:
                dataset_class, _ = dataset_config(fields)  # unknown types and keys fail here, naming them
            except ValueError as error:
                raise ValueError(f"datasets[{number}] {json.dumps(spec, sort_keys=True, default=str)}: {error}") \
                    from None
            require_count(f"datasets[{number}].repeat", repeat)
            if getattr(dataset_class, "streaming", False):
                require(repeat == 1, f"datasets[{number}].repeat", repeat,
                        f"1 (or left out) for a {fields['type']} dataset: repeat lists a map-style dataset n times "
                        "per epoch, while a stream passes over its shards once per epoch")
        require(is_count(self.resolution), "resolution", self.resolution,
                "a positive integer (a multiple of the image tokenizer's pixels per token, which the buckets check)")
        require(self.grid_multiple >= 1, "grid_multiple", self.grid_multiple, ">= 1")

    def buckets(self, pixels_per_token: int = 16) -> AspectRatioBuckets:
        return AspectRatioBuckets(self.resolution, pixels_per_token, self.multi_aspect, self.grid_multiple)


class TrainingData:
    """A dataset (map-style or streaming) with its buckets; opens per-process batch iterators.

    Args:
        dataset: an `ImageTextDataset` or a streaming dataset (``streaming = True``).
        buckets: where images are fitted.
    """

    def __init__(self, dataset: Any, buckets: AspectRatioBuckets):
        self.dataset = dataset
        self.buckets = buckets

    @property
    def streaming(self) -> bool:
        return bool(getattr(self.dataset, "streaming", False))

    @property
    def size(self) -> int | None:
        """Number of samples (scanned files included), or None for streams."""
        if self.streaming:
            return None
        return getattr(self.dataset, "scanned", len(self.dataset))

    @property
    def known_bad(self) -> list[str]:
        return list(getattr(self.dataset, "known_bad", []))

    def describe(self) -> str:
        return self.dataset.describe()

    def open(self, layout: BatchLayout, *, rank: int = 0, seed: int = 0, start_step: int = 0,
             num_workers: int = 0) -> Iterable[ImageTextBatch]:
        """This process's micro-batches from ``start_step`` on (endless)."""
        if self.streaming:
            from nextstep.training.data.webdataset import StreamingTrainingBatches

            return StreamingTrainingBatches(self.dataset, self.buckets, layout, rank=rank, seed=seed,
                                            start_step=start_step, num_workers=num_workers)
        return TrainingBatches(self.dataset, self.buckets, layout, rank=rank, seed=seed,
                               start_step=start_step, num_workers=num_workers)


def split_repeat(spec: dict) -> tuple[dict, int]:
    """A dataset spec -> its dataset's own fields (``type`` included) and its ``repeat`` count (1 when
    left out)."""
    return {key: value for key, value in spec.items() if key != "repeat"}, spec.get("repeat", 1)


def build_datasets(config: DataConfig) -> tuple[list, list[int]]:
    """The datasets of ``config``'s specs and how often each is repeated."""
    datasets, repeats = [], []
    for spec in config.datasets:
        fields, repeat = split_repeat(spec)
        datasets.append(build_dataset(fields))
        repeats.append(repeat)
    streaming = [d for d in datasets if getattr(d, "streaming", False)]
    if streaming and len(datasets) > 1:
        raise ValueError("a streaming dataset (webdataset) must be the only dataset of a recipe")
    return datasets, repeats


def combine(datasets: list, repeats: list[int]):
    """One dataset from several (concatenated, repeated)."""
    if len(datasets) == 1 and repeats[0] == 1:
        return datasets[0]
    return ConcatImageTextDataset(datasets, repeats)


def build_training_data(config: DataConfig, pixels_per_token: int = 16) -> TrainingData:
    """Datasets of ``config`` (concatenated) with their buckets; no latent cache applied."""
    datasets, repeats = build_datasets(config)
    return TrainingData(combine(datasets, repeats), config.buckets(pixels_per_token))
