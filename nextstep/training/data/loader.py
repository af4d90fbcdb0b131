"""Deterministic, resumable, rank-sharded batches from a map-style dataset.

The order of everything is a function of ``(seed, step)``:

- epoch ``e`` permutes the indices with a generator seeded by ``(seed, e)``,
  groups them by aspect-ratio bucket (keeping the permuted order), cuts each
  group into global batches and shuffles the batch order;
- optimiser step ``s`` uses global batch ``s mod batches_per_epoch`` of epoch
  ``s // batches_per_epoch``; micro-batch ``j`` of it holds the examples
  ``[j * micro, (j + 1) * micro)``;
- process ``rank`` at accumulation step ``a`` takes micro-batch
  ``j = a * world_size + rank``.

So the data position is just the step: a resumed run continues exactly where
the saved one stopped, and a job on any number of processes sees the same
global batches as a single process that accumulates over the same micro-batches.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from nextstep.images import from_pil
from nextstep.training.data.base import (
    CorruptSampleError,
    DataQualityError,
    ImageTextBatch,
    ImageTextDataset,
    ImageTextSample,
)
from nextstep.training.data.buckets import AspectRatioBuckets, resize_and_crop

logger = logging.getLogger("nextstep.training")


def mix_seed(*parts: int | str) -> int:
    """A 63-bit seed from several integers or strings (stable across runs and machines)."""
    digest = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class BatchLayout:
    """How one optimiser step's global batch is split.

    Args:
        micro_batch_size: examples per micro-batch.
        gradient_accumulation: micro-batches per process per step.
        world_size: processes.
    """

    micro_batch_size: int
    gradient_accumulation: int = 1
    world_size: int = 1

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation * self.world_size

    @property
    def micro_batches_per_step(self) -> int:
        return self.gradient_accumulation * self.world_size

    def slot(self, accumulation_index: int, rank: int) -> int:
        """Index in the global batch of the micro-batch a process handles."""
        return accumulation_index * self.world_size + rank


class BatchPlan:
    """Global batches per step, each drawn from one bucket.

    Each epoch cuts whole global batches from every bucket; a bucket's remainder
    (fewer than a global batch) waits for a later epoch's shuffle, and a bucket
    smaller than a global batch is never trained (a warning names it).

    Args:
        groups: bucket key of every index (e.g. its (height, width)).
        global_batch_size: examples per optimiser step.
        seed: base seed of the order.
    """

    def __init__(self, groups: Sequence, global_batch_size: int, seed: int):
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.groups = list(groups)
        members: dict = {}
        for index, group in enumerate(self.groups):
            members.setdefault(group, []).append(index)
        self.members = members
        self.batches_per_epoch = sum(len(m) // global_batch_size for m in members.values())
        if self.batches_per_epoch == 0:
            sizes = {str(k): len(v) for k, v in members.items()}
            raise ValueError(
                f"no bucket holds a full global batch of {global_batch_size} examples "
                f"(samples per bucket: {sizes}); use a smaller batch or more data"
            )
        unused = {str(k): len(v) for k, v in members.items() if len(v) < global_batch_size}
        if unused:
            logger.warning("%d sample(s) in bucket(s) smaller than a global batch of %d are never trained "
                           "(samples per bucket: %s); use a smaller batch, fewer buckets "
                           "(data.multi_aspect=false) or more data", sum(unused.values()), global_batch_size,
                           unused)
        self._cached_epoch: int | None = None
        self._cached_batches: list[list[int]] = []

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All global batches of ``epoch`` in training order."""
        if self._cached_epoch != epoch:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, "epoch", epoch))
            order = torch.randperm(len(self.groups), generator=generator).tolist()
            by_group: dict = {}
            for index in order:
                by_group.setdefault(self.groups[index], []).append(index)
            batches = []
            for group in sorted(by_group, key=str):
                indices = by_group[group]
                size = self.global_batch_size
                batches.extend(indices[i:i + size] for i in range(0, len(indices) - size + 1, size))
            shuffle = torch.randperm(len(batches), generator=generator).tolist()
            self._cached_batches = [batches[i] for i in shuffle]
            self._cached_epoch = epoch
        return self._cached_batches

    def global_batch(self, step: int) -> list[int]:
        """Indices of the global batch of optimiser step ``step``."""
        return self.epoch_batches(step // self.batches_per_epoch)[step % self.batches_per_epoch]

    def epoch_of(self, step: int) -> int:
        return step // self.batches_per_epoch


class RankSampler(Sampler):
    """Yields ``(indices, (height, width))`` for this process's micro-batches from ``start_step`` on, forever."""

    def __init__(self, plan: BatchPlan, layout: BatchLayout, rank: int, start_step: int,
                 sizes: Sequence[tuple[int, int]]):
        self.plan = plan
        self.layout = layout
        self.rank = rank
        self.start_step = start_step
        self.sizes = sizes

    def __iter__(self) -> Iterator[tuple[list[int], tuple[int, int]]]:
        micro = self.layout.micro_batch_size
        step = self.start_step
        while True:
            batch = self.plan.global_batch(step)
            for accumulation in range(self.layout.gradient_accumulation):
                slot = self.layout.slot(accumulation, self.rank)
                indices = batch[slot * micro:(slot + 1) * micro]
                yield indices, self.sizes[indices[0]]
            step += 1


class BatchAssembler(Dataset):
    """Reads and resizes the samples of one micro-batch (runs inside loader workers).

    An unreadable sample is replaced by the next readable one of the same
    bucket, and reported in the batch's ``bad_keys``.

    Args:
        dataset: the samples.
        groups: bucket key of every index (replacements come from the same bucket).
        max_replacements: how many neighbours to try before giving up.
    """

    def __init__(self, dataset: ImageTextDataset, groups: Sequence, max_replacements: int = 64):
        self.dataset = dataset
        self.groups = list(groups)
        self.max_replacements = max_replacements
        members: dict = {}
        for index, group in enumerate(self.groups):
            members.setdefault(group, []).append(index)
        self.members = members
        self.position = {index: pos for group in members.values() for pos, index in enumerate(group)}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, request: tuple[list[int], tuple[int, int]]) -> ImageTextBatch:
        indices, (height, width) = request
        samples, bad, attempted = [], [], 0
        for index in indices:
            sample, failed, tries = self._load_with_replacement(index)
            samples.append(sample)
            bad.extend(failed)
            attempted += tries
        return collate_samples(samples, height, width, bad_keys=bad, attempted=attempted)

    def _load_with_replacement(self, index: int) -> tuple[ImageTextSample, list[str], int]:
        group = self.members[self.groups[index]]
        start = self.position[index]
        failed = []
        for offset in range(min(self.max_replacements, len(group))):
            candidate = group[(start + offset) % len(group)]
            try:
                return self.dataset.load(candidate), failed, offset + 1
            except CorruptSampleError as error:
                failed.append(f"{error.key} ({error.reason})")
        raise DataQualityError(
            f"{len(failed)} samples in a row could not be read near index {index}: {failed[:5]}"
        )


def _image_tensor(image, height: int, width: int) -> torch.Tensor:
    if image.size != (width, height):
        image = resize_and_crop(image, height, width)
    return from_pil([image])[0]


def collate_samples(samples: list[ImageTextSample], height: int, width: int, *,
                    bad_keys: list[str] | None = None, attempted: int = 0) -> ImageTextBatch:
    """Stack samples of one bucket into an `ImageTextBatch` (images resized and centre-cropped)."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    cached = samples[0].tokens is not None
    batch = ImageTextBatch(
        keys=[s.key for s in samples],
        captions=[s.caption for s in samples],
        bad_keys=list(bad_keys or []),
        attempted=attempted or len(samples),
    )
    if any((s.tokens is None) == cached for s in samples[1:]):
        raise ValueError(f"a batch holds samples with cached tokens and samples without "
                         f"({[s.key for s in samples if s.tokens is None][:5]}); datasets of one run must be all "
                         "cached or all images")
    if cached:
        grids = {s.grid for s in samples}
        if len(grids) != 1:
            raise ValueError(f"cached samples of one batch must share a token grid, found {sorted(grids)}")
        batch.tokens = torch.stack([s.tokens for s in samples])
        batch.grid = samples[0].grid
    else:
        missing = [s.key for s in samples if s.image is None]
        if missing:
            raise ValueError(f"samples without image or cached tokens: {missing[:5]}")
        batch.images = torch.stack([_image_tensor(s.image, height, width) for s in samples])
    if any(s.source_tokens is not None for s in samples):
        batch.source_tokens = torch.stack([s.source_tokens for s in samples])
        batch.source_grid = samples[0].source_grid
    elif any(s.source_image is not None for s in samples):
        missing = [s.key for s in samples if s.source_image is None]
        if missing:
            raise ValueError(f"editing batch mixes samples without a source image: {missing[:5]}")
        batch.source_images = torch.stack([_image_tensor(s.source_image, height, width) for s in samples])
    if any(s.rejected_image is not None for s in samples):
        missing = [s.key for s in samples if s.rejected_image is None]
        if missing:
            raise ValueError(f"preference batch mixes samples without a rejected image: {missing[:5]}")
        if cached:
            raise ValueError("preference samples carry images, not cached tokens: train them from images")
        batch.rejected_images = torch.stack([_image_tensor(s.rejected_image, height, width) for s in samples])
    return batch


def _identity(batch):
    return batch


class TrainingBatches:
    """The micro-batches one process trains on, from a given step on.

    Iterating yields `ImageTextBatch` objects in the order the training loop
    consumes them: for each step, ``gradient_accumulation`` micro-batches.

    Args:
        dataset: a map-style dataset.
        buckets: the aspect-ratio buckets images are fitted into.
        layout: how a global batch is split.
        rank: this process's rank.
        seed: base seed of the order.
        start_step: first optimiser step to produce.
        num_workers: loader worker processes (0 reads in this process).
    """

    def __init__(self, dataset: ImageTextDataset, buckets: AspectRatioBuckets, layout: BatchLayout,
                 *, rank: int = 0, seed: int = 0, start_step: int = 0, num_workers: int = 0):
        if len(dataset) == 0:
            raise ValueError(f"{dataset.describe()} is empty: nothing to train on")
        dataset.check_buckets(buckets)
        self.dataset = dataset
        self.sizes = [buckets.assign(*dataset.image_size(i)) for i in range(len(dataset))]
        self.plan = BatchPlan(self.sizes, layout.global_batch_size, seed)
        self.layout = layout
        sampler = RankSampler(self.plan, layout, rank, start_step, self.sizes)
        self.loader = DataLoader(
            BatchAssembler(dataset, self.sizes), sampler=sampler, batch_size=None,
            collate_fn=_identity, num_workers=num_workers,
            prefetch_factor=4 if num_workers else None,
        )

    @property
    def dataset_size(self) -> int:
        return len(self.dataset)

    def epoch_of(self, step: int) -> int:
        return self.plan.epoch_of(step)

    def __iter__(self) -> Iterator[ImageTextBatch]:
        return iter(self.loader)
