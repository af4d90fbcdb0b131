"""Sharded tar files in WebDataset layout, streamed: ``key.jpg`` + ``key.txt`` per sample.

Members of one sample are adjacent in the tar and share a key (the member path
up to the first dot of its file name). Shards are read sequentially, a member
at a time, so memory holds only a shuffle buffer and one batch per bucket.

Every process (and every loader worker) reads its own subset of the shards,
re-dealt each epoch by a seeded shuffle. The stream is deterministic, so a
resumed run replays it up to the saved position, reading image headers only,
and then continues exactly as the uninterrupted run would.

A reader that has read every shard without finding one sample it can use (no
member among ``image_keys`` with a readable header, or no sample at all) raises
`DataQualityError` instead of reading on forever.
"""

from __future__ import annotations

import glob
import io
import random
import tarfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from nextstep.config import Config, require
from nextstep.images import IMAGE_ERRORS, oriented_size
from nextstep.training.data.base import CorruptSampleError, DataQualityError, ImageTextBatch, ImageTextSample
from nextstep.training.data.buckets import AspectRatioBuckets
from nextstep.training.data.folder import open_image
from nextstep.training.data.loader import BatchLayout, collate_samples, mix_seed
from nextstep.training.data.registry import register_dataset

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
#: Groups a resumed stream keeps per bucket of those it skipped, to find the bucket's last good sample in.
SKIPPED_GROUPS_KEPT = 8


@dataclass
class WebDatasetConfig(Config):
    """Which shards to stream and how to read them.

    Args:
        shards: tar paths or glob patterns (``data/train-{000..099}.tar`` style
            brace ranges are expanded too).
        caption_key: member extension of the caption.
        image_keys: member extensions tried, in order, for the image.
        shuffle_buffer: samples held for shuffling within the stream (0 or 1 keeps file order).
    """

    shards: tuple[str, ...] = ()
    caption_key: str = "txt"
    image_keys: tuple[str, ...] = IMAGE_KEYS
    shuffle_buffer: int = 256

    def validate(self) -> None:
        require(len(self.shards) > 0, "shards", self.shards, "at least one tar path or pattern")
        require(self.shuffle_buffer >= 0, "shuffle_buffer", self.shuffle_buffer, ">= 0")


def expand_braces(pattern: str) -> list[str]:
    """``a-{00..02}.tar`` -> ``["a-00.tar", "a-01.tar", "a-02.tar"]``: numbers padded with zeros to the wider
    bound when either bound is written with leading zeros, as a shell expands them (``{1..03}``: 01 to 03).

    Raises:
        ValueError: a range whose bounds are not non-negative integers, naming the pattern.
    """
    start = pattern.find("{")
    end = pattern.find("}", start)
    if start < 0 or end < 0 or ".." not in pattern[start:end]:
        return [pattern]
    low, high = pattern[start + 1:end].split("..", 1)
    if not (low.isdigit() and high.isdigit()):
        raise ValueError(f"shard pattern {pattern!r}: expected a range of numbers such as {{000..099}}, found "
                         f"{{{low}..{high}}}")
    padded = (len(low) > 1 and low.startswith("0")) or (len(high) > 1 and high.startswith("0"))
    width = max(len(low), len(high)) if padded else 0
    out = []
    for number in range(int(low), int(high) + 1):
        out.extend(expand_braces(pattern[:start] + str(number).zfill(width) + pattern[end + 1:]))
    return out


@dataclass
class RawSample:
    """A sample's members as bytes, before decoding.

    Attributes:
        key: the sample's name in its shard (the members' shared stem).
        shard: path of the tar it was read from.
        members: bytes by lower-cased extension.
        epoch: the pass over the shards it was read in (0-based; per reader).
    """

    key: str
    shard: str
    members: dict[str, bytes]
    epoch: int = 0


def read_shard(path: str | Path) -> Iterator[RawSample]:
    """Samples of one tar, streamed in file order."""
    current_key, members = None, {}
    try:
        with tarfile.open(path, mode="r|*") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                directory, _, name = member.name.rpartition("/")
                stem, dot, extension = name.partition(".")
                if not dot:
                    continue
                key = f"{directory}/{stem}" if directory else stem
                if key != current_key and current_key is not None:
                    yield RawSample(current_key, str(path), members)
                    members = {}
                current_key = key
                handle = archive.extractfile(member)
                members[extension.lower()] = handle.read() if handle is not None else b""
    except (tarfile.TarError, OSError, EOFError) as error:
        raise CorruptSampleError(str(path), f"unreadable tar shard ({error})") from None
    if current_key is not None:
        yield RawSample(current_key, str(path), members)


@register_dataset("webdataset")
class WebDataset:
    """A set of WebDataset shards; `stream` yields one process slot's samples."""

    config_class = WebDatasetConfig
    streaming = True

    def __init__(self, config: WebDatasetConfig | None = None):
        self.config = config or WebDatasetConfig()
        paths: list[str] = []
        for pattern in self.config.shards:
            for expanded in expand_braces(pattern):
                matches = sorted(glob.glob(expanded)) if any(c in expanded for c in "*?[") else [expanded]
                paths.extend(matches)
        missing = [p for p in paths if not Path(p).is_file()]
        if missing or not paths:
            raise FileNotFoundError(
                f"expected tar shards at {list(self.config.shards)}, missing: {missing[:5] or 'all'}"
            )
        self.shards = paths

    def describe(self) -> str:
        return f"WebDataset ({len(self.shards)} shards)"

    def decode_caption(self, raw: RawSample) -> str:
        data = raw.members.get(self.config.caption_key)
        if data is None:
            raise ValueError(
                f"sample {raw.key!r} in shard {raw.shard} has no caption: expected a member "
                f"{raw.key}.{self.config.caption_key}, found {sorted(raw.members)}"
            )
        try:
            return data.decode("utf-8-sig").strip()  # without a byte-order mark, as sidecar captions
        except UnicodeDecodeError as error:
            raise CorruptSampleError(f"{raw.shard}:{raw.key}", f"caption is not UTF-8 text ({error})") from None

    def image_bytes(self, raw: RawSample) -> tuple[str, bytes]:
        for extension in self.config.image_keys:
            if extension in raw.members:
                return extension, raw.members[extension]
        raise CorruptSampleError(f"{raw.shard}:{raw.key}", f"no image member among {list(self.config.image_keys)}")

    def dealt(self, slot: int, num_slots: int, seed: int, epoch: int) -> list[str]:
        """The shards reader ``slot`` of ``num_slots`` reads in pass ``epoch``: the shards shuffled with
        ``(seed, epoch)``, dealt round-robin."""
        order = list(self.shards)
        random.Random(mix_seed(seed, "shards", epoch)).shuffle(order)
        return order[slot::num_slots]

    def stream(self, slot: int, num_slots: int, seed: int) -> Iterator[tuple[RawSample, bool]]:
        """Endless samples of one slot, epoch after epoch; yields ``(sample, is_bad_shard)``.

        Epoch ``e`` deals the shards, shuffled with ``(seed, e)``, round-robin to
        the ``num_slots`` slots, then shuffles samples through a buffer seeded
        with ``(seed, e, slot)``. Each sample's ``epoch`` is ``e``.

        Raises:
            ValueError: fewer shards than slots.
            DataQualityError: this slot has read every shard and none held a sample (an
                unreadable shard counts as holding one: the reader reports it).
        """
        if len(self.shards) < num_slots:
            raise ValueError(
                f"{len(self.shards)} shards cannot feed {num_slots} readers (processes x loader workers); "
                "write more shards or use fewer workers"
            )
        epoch = 0
        empty: set[str] | None = set()  # shards read without yielding anything, while none has (then None)
        while True:
            rng = random.Random(mix_seed(seed, "buffer", epoch, slot))
            buffer: list[RawSample] = []
            for shard in self.dealt(slot, num_slots, seed, epoch):
                if empty is not None:
                    empty.add(shard)
                try:
                    for raw in read_shard(shard):
                        empty = None
                        raw.epoch = epoch
                        if self.config.shuffle_buffer <= 1:
                            yield raw, False
                            continue
                        buffer.append(raw)
                        if len(buffer) >= self.config.shuffle_buffer:
                            yield buffer.pop(rng.randrange(len(buffer))), False
                except CorruptSampleError as error:
                    empty = None
                    yield RawSample(error.key, shard, {}, epoch), True
            rng.shuffle(buffer)
            for raw in buffer:
                yield raw, False
            if empty is not None and len(empty) == len(set(self.shards)):
                example = f"key.{self.config.image_keys[0]} and key.{self.config.caption_key}"
                raise DataQualityError(f"{self.describe()} holds no sample: expected tar members named key.extension "
                                       f"(such as {example}) in {sorted(empty)[:5]}, found none")
            epoch += 1


class StreamingBatches(IterableDataset):
    """Micro-batches of one process from a `WebDataset`, bucketed by aspect ratio on the fly.

    Samples gather per bucket; a bucket that holds ``micro_batch_size`` samples
    becomes a batch. Runs in loader workers; worker ``w`` of process ``rank``
    reads slot ``rank * workers + w`` (shifted on resume so that batches come
    in the uninterrupted order).

    Args:
        dataset: the shards.
        buckets: aspect-ratio buckets.
        micro_batch_size: samples per batch.
        rank: this process's rank.
        world_size: processes.
        seed: base seed.
        skip_batches: batches this process already consumed (resume position).
    """

    def __init__(self, dataset: WebDataset, buckets: AspectRatioBuckets, micro_batch_size: int, *,
                 rank: int = 0, world_size: int = 1, seed: int = 0, skip_batches: int = 0):
        self.dataset = dataset
        self.buckets = buckets
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.skip_batches = skip_batches

    def __iter__(self) -> Iterator[ImageTextBatch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The loader takes batches from its workers in turn, starting with worker 0: batch k of the
        # run came from reader k % workers. Resumed at batch K, worker w plays reader (K + w) % workers,
        # which had made every workers-th batch of the K consumed.
        role = (worker + self.skip_batches) % workers
        slot, num_slots = self.rank * workers + role, self.world_size * workers
        skip = (self.skip_batches - role + workers - 1) // workers if self.skip_batches > role else 0
        pending: dict[tuple[int, int], list[tuple[RawSample, str, Image.Image | None]]] = {}
        # Per bucket: the last sample that decoded, which stands in for a group none of whose pixels
        # decode; and the last groups skipped on resume, to find it again from.
        last_good: dict[tuple[int, int], ImageTextSample] = {}
        skipped: dict[tuple[int, int], deque] = {}
        bad: list[str] = []
        attempted = 0
        # Until a sample's header reads: the shards read, the member extensions found, and the pass
        # read last, to stop once every shard has been read in full without a sample to use.
        useless: _UselessShards | None = _UselessShards(self.dataset, slot, num_slots, self.seed)
        for raw, is_bad_shard in self.dataset.stream(slot, num_slots, self.seed):
            if useless is not None:
                useless.read(raw, is_bad_shard)
            attempted += 1
            if is_bad_shard:
                bad.append(f"{raw.key} (unreadable tar shard)")
                continue
            try:
                caption = self.dataset.decode_caption(raw)  # a missing caption stops the run (a ValueError)
            except CorruptSampleError as error:
                bad.append(f"{error}")
                continue
            try:
                _, data = self.dataset.image_bytes(raw)
                with Image.open(io.BytesIO(data)) as image:
                    width, height = oriented_size(image)
            except (CorruptSampleError, *IMAGE_ERRORS) as error:
                bad.append(f"{raw.shard}:{raw.key} ({error})")
                continue
            useless = None
            size = self.buckets.assign(width, height)
            group = pending.setdefault(size, [])
            group.append((raw, caption))
            if len(group) < self.micro_batch_size:
                continue
            del pending[size]
            if skip > 0:
                skip -= 1
                skipped.setdefault(size, deque(maxlen=SKIPPED_GROUPS_KEPT)).append(group)
                bad, attempted = [], 0
                continue
            batch = self._decode(group, size, bad, attempted, last_good, skipped)
            if batch is None:
                continue  # its failures are reported with the next batch
            bad, attempted = [], 0
            yield batch

    def _open(self, raw: RawSample, caption: str, bad: list[str] | None = None) -> ImageTextSample | None:
        """The decoded sample, or None (its failure appended to ``bad``)."""
        try:
            _, data = self.dataset.image_bytes(raw)
            image = open_image(f"{raw.shard}:{raw.key}", data)
        except CorruptSampleError as error:
            if bad is not None:
                bad.append(f"{error.key} ({error.reason})")
            return None
        return ImageTextSample(key=f"{raw.shard}:{raw.key}", caption=caption, image=image)

    def _decode(self, group, size, bad, attempted, last_good, skipped) -> ImageTextBatch | None:
        samples = [sample for raw, caption in group if (sample := self._open(raw, caption, bad)) is not None]
        if samples:
            last_good[size] = samples[-1]
            skipped.pop(size, None)
        else:
            # The group still makes a batch, as a resumed stream (which counts groups by their headers)
            # assumes it does: from the bucket's last good sample, found again among the groups a
            # resumed stream skipped if it decoded none since.
            for earlier in reversed(skipped.pop(size, ())):
                found = [sample for raw, caption in reversed(earlier) if (sample := self._open(raw, caption))]
                if found:
                    last_good[size] = found[0]
                    break
            if size not in last_good:
                return None
            samples = [last_good[size]]
        # A sample whose pixels fail after a good header is replaced by a good one of the
        # batch, so every batch keeps its size.
        samples.extend(samples[i % len(samples)] for i in range(len(group) - len(samples)))
        batch = collate_samples(samples, size[0], size[1], bad_keys=bad, attempted=attempted)
        batch.epoch = max(raw.epoch for raw, _ in group)
        return batch


class _UselessShards:
    """The shards a reader has read in full without one sample whose image header reads.

    `read` raises `DataQualityError` once that is every shard of the dataset: no sample would ever
    make a batch, and the stream would be read forever.
    """

    def __init__(self, dataset: WebDataset, slot: int, num_slots: int, seed: int):
        self.dataset = dataset
        self.slot, self.num_slots, self.seed = slot, num_slots, seed
        self.read_in_full: set[str] = set()  # shards dealt to this reader in the passes before ``epoch``
        self.epoch = 0
        self.extensions: set[str] = set()
        self.unreadable: set[str] = set()

    def read(self, raw: RawSample, is_bad_shard: bool) -> None:
        while raw.epoch > self.epoch:  # the passes before this sample's are read in full (empty tars too)
            self.read_in_full.update(self.dataset.dealt(self.slot, self.num_slots, self.seed, self.epoch))
            self.epoch += 1
            if len(self.read_in_full) == len(set(self.dataset.shards)):
                raise DataQualityError(self._message())
        if is_bad_shard:
            self.unreadable.add(raw.shard)
        self.extensions.update(raw.members)

    def _message(self) -> str:
        config = self.dataset.config
        found = (f"member extensions {sorted(self.extensions)}" if self.extensions else "no member")
        unreadable = (f" ({len(self.unreadable)} of {len(self.dataset.shards)} shards are unreadable tars, e.g. "
                      f"{sorted(self.unreadable)[0]})" if self.unreadable else "")
        return (f"no sample of {self.dataset.describe()} can be read after a full pass over its shards: expected "
                f"an image member with an extension among image_keys {list(config.image_keys)} (and a readable "
                f"image header), found {found}{unreadable}")


def _identity(batch):
    return batch


class StreamingTrainingBatches:
    """The micro-batches one process trains on from a `WebDataset`, from a given step on.

    Args:
        dataset: the shards.
        buckets: aspect-ratio buckets.
        layout: how a global batch is split.
        rank: this process's rank.
        seed: base seed.
        start_step: first optimiser step to produce.
        num_workers: loader worker processes.
    """

    dataset_size = None

    def __init__(self, dataset: WebDataset, buckets: AspectRatioBuckets, layout: BatchLayout, *,
                 rank: int = 0, seed: int = 0, start_step: int = 0, num_workers: int = 0):
        self.stream = StreamingBatches(
            dataset, buckets, layout.micro_batch_size, rank=rank, world_size=layout.world_size,
            seed=seed, skip_batches=start_step * layout.gradient_accumulation,
        )
        self.loader = DataLoader(self.stream, batch_size=None, collate_fn=_identity,
                                 num_workers=num_workers, prefetch_factor=4 if num_workers else None)

    def __iter__(self) -> Iterator[ImageTextBatch]:
        return iter(self.loader)
