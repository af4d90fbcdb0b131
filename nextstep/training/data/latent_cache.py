"""Image tokens computed once and stored in safetensors shards, so training skips the VAE.

A cache folder holds ``shard-XXXXX.safetensors`` files (each: a ``tokens``
tensor (n, N, D) of one token grid, with keys and captions in the file's
metadata) and ``index.json``, written last: a folder without it is incomplete
and is rebuilt. The index records a fingerprint of what the image tokenizer's
encoder depends on (`ImageTokenizer.encoding_identity`) and of the data, so a
cache made with another encoder or dataset is refused instead of silently used,
while a model whose decoder was replaced keeps its cache. Indexes of format 1
fingerprinted the whole tokenizer; the tokenizer that built one still matches
it, and its first use rewrites the index in the current format.

Legend: n samples in a shard, N tokens per image, D token dim.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nextstep.config import Config, require
from nextstep.io import atomic_path, atomic_write_text
from nextstep.tokenizers.base import ImageTokenizer, module_identity
from nextstep.training.data.base import CorruptSampleError, ImageTextDataset, ImageTextSample
from nextstep.training.data.buckets import AspectRatioBuckets
from nextstep.training.data.loader import collate_samples
from nextstep.training.data.quality import BadSampleTracker
from nextstep.training.data.registry import register_dataset

logger = logging.getLogger("nextstep.training")

INDEX_FILE = "index.json"
FORMAT_VERSION = 2


def tokenizer_fingerprint(tokenizer: torch.nn.Module) -> str:
    """A hash of what the tokenizer's encoder depends on (`ImageTokenizer.encoding_identity`;
    for another module, its class, config and weights)."""
    identity = getattr(tokenizer, "encoding_identity", None)
    return _hash(*identity()) if identity is not None else _whole_module_fingerprint(tokenizer)


def _whole_module_fingerprint(tokenizer: torch.nn.Module) -> str:
    """The fingerprint of format 1: class, config and every weight, decoder included."""
    return _hash(*module_identity(tokenizer))


def _hash(description: str, tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(description.encode())
    for name, tensor in sorted(tensors.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def _with_source(fingerprint: str, source: str) -> str:
    return hashlib.sha256(f"{fingerprint} {source}".encode()).hexdigest()[:32] if source else fingerprint


def _existing_cache_matches(index: dict, index_path: Path, tokenizer: torch.nn.Module, fingerprint: str,
                            source: str, num_samples: int) -> bool:
    """Whether the complete cache whose ``index`` was read from ``index_path`` holds this encoder's
    latents of this data; a matching index of format 1 is rewritten in the current format."""
    if index.get("num_source_samples") != num_samples:
        return False
    if index.get("format_version", 1) >= 2:
        return index.get("fingerprint") == fingerprint
    if index.get("fingerprint") != _with_source(_whole_module_fingerprint(tokenizer), source):
        return False
    index.update(format_version=FORMAT_VERSION, fingerprint=fingerprint)
    atomic_write_text(index_path, json.dumps(index, indent=1) + "\n")
    logger.info("latent cache %s: index rewritten in format %d", index_path.parent, FORMAT_VERSION)
    return True


def latent_cache_ready(tokenizer: ImageTokenizer, dataset: ImageTextDataset, directory: str | Path,
                       source: str = "") -> bool:
    """Whether ``directory`` holds the complete cache of ``dataset`` through this tokenizer's encoder
    (False: there is none yet, build it); a cache of another encoder or dataset raises.

    Args:
        tokenizer: the image tokenizer whose encoder the cache must hold.
        dataset: the image-caption pairs it must hold.
        directory: the cache folder.
        source: the description of the dataset and buckets, as for `build_latent_cache`.

    Raises:
        ValueError: a complete cache built from another tokenizer encoder or dataset.
    """
    index_path = Path(directory) / INDEX_FILE
    if not index_path.is_file():
        return False
    index = json.loads(index_path.read_text())
    fingerprint = _with_source(tokenizer_fingerprint(tokenizer), source)  # hashes the encoder: only when needed
    if _existing_cache_matches(index, index_path, tokenizer, fingerprint, source, len(dataset)):
        return True
    raise ValueError(
        f"the latent cache at {directory} was built from another tokenizer encoder or dataset "
        f"(fingerprint {index.get('fingerprint')}, {index.get('num_source_samples')} samples; "
        f"now {fingerprint}, {len(dataset)}); delete it or choose another latent_cache folder"
    )


@torch.no_grad()
def build_latent_cache(
    tokenizer: ImageTokenizer,
    dataset: ImageTextDataset,
    buckets: AspectRatioBuckets,
    directory: str | Path,
    *,
    batch_size: int = 32,
    shard_size: int = 1024,
    device: torch.device | str = "cpu",
    max_bad_fraction: float = 0.01,
    progress: bool = False,
    source: str = "",
) -> Path:
    """Encode every sample of ``dataset`` and write the cache to ``directory``.

    An existing complete cache made with the same tokenizer is kept as is.

    Args:
        tokenizer: an `ImageTokenizer` (a NextStep model's ``image_tokenizer``).
        dataset: the image-caption pairs.
        buckets: the aspect-ratio buckets images are fitted into before encoding.
        directory: the cache folder.
        batch_size: images per encoder call.
        shard_size: samples per shard file.
        device: where to run the encoder.
        max_bad_fraction: fail if more unreadable samples than this share.
        progress: show a progress bar.
        source: a description of the dataset and buckets (e.g. its spec as JSON);
            a cache built from another description is refused.

    Returns:
        the cache folder.
    """
    directory = Path(directory)
    if latent_cache_ready(tokenizer, dataset, directory, source):
        return directory
    if tokenizer.samples_latents:
        logger.warning("the image tokenizer samples its latents: the cache keeps one sample per image, where "
                       "encoding during training would draw a new one every step")
    fingerprint = _with_source(tokenizer_fingerprint(tokenizer), source)
    index_path = directory / INDEX_FILE
    directory.mkdir(parents=True, exist_ok=True)
    tracker = BadSampleTracker(max_bad_fraction, getattr(dataset, "scanned", len(dataset)),
                               getattr(dataset, "known_bad", []))
    groups: dict[tuple[int, int], list[int]] = {}
    for index in range(len(dataset)):
        groups.setdefault(buckets.assign(*dataset.image_size(index)), []).append(index)
    tokenizer = tokenizer.to(device).eval()
    shards = []
    from tqdm import tqdm

    bar = tqdm(total=len(dataset), disable=not progress, unit="img", desc="latent cache")
    for (height, width), indices in sorted(groups.items()):
        pending_tokens, pending_keys, pending_captions = [], [], []
        for start in range(0, len(indices), batch_size):
            samples = []
            for index in indices[start:start + batch_size]:
                try:
                    samples.append(dataset.load(index))
                except CorruptSampleError as error:
                    tracker.update(1, [f"{error.key} ({error.reason})"])
                    continue
                tracker.update(1, [])
            bar.update(len(indices[start:start + batch_size]))
            if not samples:
                continue
            if any(s.source_image is not None or s.rejected_image is not None for s in samples):
                raise ValueError(
                    f"{dataset.describe()} holds editing or preference samples; latent caches store "
                    "image-caption pairs only, so train them from images (leave data.latent_cache empty)"
                )
            batch = collate_samples(samples, height, width)
            # A sampled posterior: the same sample of each image on every build.
            latents = tokenizer.encode_seeded(batch.images.to(device), indices[start])
            tokens = tokenizer.patchify(latents).float().cpu()  # (B, N, D)
            pending_tokens.append(tokens)
            pending_keys.extend(batch.keys)
            pending_captions.extend(batch.captions)
            while sum(t.shape[0] for t in pending_tokens) >= shard_size:
                shards.append(_flush(directory, len(shards), pending_tokens, pending_keys, pending_captions,
                                     (height, width), buckets.pixels_per_token, shard_size))
        if pending_keys:
            shards.append(_flush(directory, len(shards), pending_tokens, pending_keys, pending_captions,
                                 (height, width), buckets.pixels_per_token, None))
    bar.close()
    index = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "num_source_samples": len(dataset),
        "scanned_samples": getattr(dataset, "scanned", len(dataset)),
        "num_samples": sum(s["count"] for s in shards),
        "pixels_per_token": buckets.pixels_per_token,
        "token_dim": int(tokenizer.token_dim),
        "bad_samples": sorted(tracker.bad),
        "shards": shards,
    }
    atomic_write_text(index_path, json.dumps(index, indent=1) + "\n")
    return directory


def _flush(directory: Path, number: int, pending_tokens: list, keys: list, captions: list,
           size: tuple[int, int], pixels_per_token: int, limit: int | None) -> dict:
    tokens = torch.cat(pending_tokens)
    count = tokens.shape[0] if limit is None else limit
    name = f"shard-{number:05d}.safetensors"
    grid = (size[0] // pixels_per_token, size[1] // pixels_per_token)
    metadata = {"keys": json.dumps(keys[:count]), "captions": json.dumps(captions[:count]),
                "grid": json.dumps(list(grid))}
    with atomic_path(directory / name) as tmp:
        save_file({"tokens": tokens[:count].contiguous()}, str(tmp), metadata=metadata)
    rest = tokens[count:]
    pending_tokens[:] = [rest] if rest.shape[0] else []
    del keys[:count], captions[:count]
    return {"file": name, "count": int(count), "grid": list(grid)}


@dataclass
class LatentCacheConfig(Config):
    """A latent cache folder written by `build_latent_cache`.

    Args:
        path: the cache folder.
    """

    path: str = ""

    def validate(self) -> None:
        require(bool(self.path), "path", self.path, "a latent cache folder")


@register_dataset("latent_cache")
class LatentCacheDataset(ImageTextDataset):
    """Samples with cached tokens (no images): keys, captions, tokens (N, D) and grids.

    Attributes:
        known_bad: the samples that could not be read while the cache was built (excluded), so that
            training counts them against its limit as it would when reading the images.
        scanned: how many samples the build looked at.
    """

    config_class = LatentCacheConfig

    def __init__(self, config: LatentCacheConfig | None = None):
        self.config = config or LatentCacheConfig()
        directory = Path(self.config.path)
        index_path = directory / INDEX_FILE
        if not index_path.is_file():
            raise FileNotFoundError(
                f"expected a complete latent cache (with {INDEX_FILE}) at {directory}, found none; "
                "build it with nextstep.training.build_latent_cache or set data.latent_cache in the recipe"
            )
        self.index = json.loads(index_path.read_text())
        self.directory = directory
        self.pixels_per_token = int(self.index["pixels_per_token"])
        self.fingerprint = self.index["fingerprint"]
        self.known_bad: list[str] = list(self.index.get("bad_samples", []))
        self.scanned = int(self.index.get("scanned_samples", self.index.get("num_source_samples", 0)))
        self.locations: list[tuple[int, int]] = []
        self.grids: list[tuple[int, int]] = []
        self.keys: list[str] = []
        self.captions: list[str] = []
        for number, shard in enumerate(self.index["shards"]):
            path = directory / shard["file"]
            if not path.is_file():
                raise FileNotFoundError(f"latent cache shard {path} is missing; rebuild the cache")
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata()
            keys, captions = json.loads(metadata["keys"]), json.loads(metadata["captions"])
            self.keys.extend(keys)
            self.captions.extend(captions)
            self.locations.extend((number, row) for row in range(len(keys)))
            self.grids.extend([tuple(shard["grid"])] * len(keys))
        self._handles: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.keys)

    def _handle(self, number: int):
        if number not in self._handles:
            path = self.directory / self.index["shards"][number]["file"]
            self._handles[number] = safe_open(str(path), framework="pt")
        return self._handles[number]

    def load(self, index: int) -> ImageTextSample:
        number, row = self.locations[index]
        tokens = self._handle(number).get_slice("tokens")[row:row + 1][0].clone()
        return ImageTextSample(key=self.keys[index], caption=self.captions[index], tokens=tokens,
                               grid=self.grids[index])

    def caption(self, index: int) -> str:
        return self.captions[index]

    def image_size(self, index: int) -> tuple[int, int]:
        height, width = self.grids[index]
        return (width * self.pixels_per_token, height * self.pixels_per_token)

    def check_buckets(self, buckets) -> None:
        """Cached tokens are not resized: each cached grid must be one of the run's buckets."""
        sizes = {(height * self.pixels_per_token, width * self.pixels_per_token)
                 for height, width in set(self.grids)}
        outside = sorted(sizes - set(buckets.sizes))
        if outside:
            raise ValueError(
                f"the latent cache at {self.config.path} holds images of (height, width) {outside} in pixels, "
                f"which are not among this run's buckets {sorted(buckets.sizes)}; cached tokens cannot be "
                "resized: train with the resolution and multi_aspect the cache was built with, or build a "
                "cache for these buckets")

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}  # file handles do not travel to loader workers
        return state
