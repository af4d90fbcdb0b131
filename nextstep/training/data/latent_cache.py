"""Image tokens computed once and stored in safetensors shards, so training skips the VAE.

A cache folder holds ``shard-XXXXX.safetensors`` files (each: a ``tokens``
tensor (n, N, D) of one token grid, with keys, captions and the samples' indices
in the source dataset in the file's metadata) and ``index.json``, written last:
a folder without it, or without a shard it lists, is incomplete and is rebuilt.
The index records a fingerprint of what the image tokenizer's encoder depends on
(`ImageTokenizer.encoding_identity`) and of the data, so a cache made with
another encoder or dataset is refused instead of silently used, while a model
whose decoder was replaced keeps its cache; beside it, what the cache was built
from (``built_from``: the bucket settings and the dataset's description), so that
a refusal names what differs. The index also records the encoder's fingerprint
alone (``tokenizer_fingerprint``), the token width and the pixels per token,
which a ``latent_cache`` dataset is checked against
(`LatentCacheDataset.check_tokenizer`). Indexes of format 1 fingerprinted the
whole tokenizer; the tokenizer that built one still matches it, and its first use
rewrites the index in the current format (as it adds ``tokenizer_fingerprint``
and ``built_from`` to an index written before they were recorded).

Shards group samples by bucket, and a cache serves its samples in the order of
their indices in the source dataset: source sample ``i`` is its sample ``i``, so
that a run reads the same batches from it as from the images. A sample the build
could not read is recorded in the index (``dropped_samples``: its source index,
key, reason, token grid and caption when the dataset could give it) and stays a
sample of the cache that raises `CorruptSampleError` when loaded, as reading the
image did, so that the loader replaces it as it would in a run from images.
Caches written before the source indices were recorded (no ``sample_order`` in
the index) serve their samples in shard order; caches written before the
dropped samples were recorded serve the samples they hold in source order,
without the dropped ones.

Legend: n samples in a shard, N tokens per image, D token dim.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from nextstep.config import Config, differences_phrase, plain_differences, require, require_count
from nextstep.io import atomic_path, atomic_write_text, read_json_object
from nextstep.tokenizers.base import ImageTokenizer, module_identity
from nextstep.training.data.base import CorruptSampleError, ImageTextDataset, ImageTextSample, sample_kind_of
from nextstep.training.data.buckets import AspectRatioBuckets
from nextstep.training.data.loader import collate_samples
from nextstep.training.data.quality import BadSampleTracker
from nextstep.training.data.registry import register_dataset

logger = logging.getLogger("nextstep.training")

INDEX_FILE = "index.json"
FORMAT_VERSION = 2
#: The index's ``sample_order`` of a cache whose shards record their samples' source indices.
SOURCE_ORDER = "source"


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


def read_index(path: Path) -> dict:
    """A cache's ``index.json`` as a mapping.

    Raises:
        FileNotFoundError, ValueError: no file, or one that is not a JSON object, naming it.
    """
    try:
        return read_json_object(path, "latent cache index")
    except ValueError as error:
        raise ValueError(f"latent cache index: {error}; delete the folder {path.parent} to rebuild the cache, "
                         "or choose another latent_cache folder") from None


def cache_description(buckets: AspectRatioBuckets, dataset: dict | None = None) -> dict:
    """What a cache is built from, as its index records it (``built_from``): the bucket settings and,
    when given, a description of the dataset (a recipe gives its spec as the dataset reads it and a
    digest of its files), as JSON reads them back."""
    described: dict = {"buckets": {"resolution": buckets.resolution, "multi_aspect": buckets.multi_aspect,
                                   "grid_multiple": buckets.grid_multiple,
                                   "pixels_per_token": buckets.pixels_per_token}}
    if dataset is not None:
        described["dataset"] = dataset
    return json.loads(json.dumps(described))


def shard_files(index: dict, directory: Path) -> list[list]:
    """Each shard file ``index`` lists, as [name, bytes, modification time in ns] in ``directory`` (bytes and
    time None for a file that is not there): what a cache whose index alone was rewritten (its format
    upgraded, its data described again) keeps, and a rebuilt cache does not."""
    files = []
    for shard in index.get("shards", []):
        path = directory / str(shard.get("file"))
        stat = path.stat() if path.is_file() else None
        files.append([path.name, stat.st_size, stat.st_mtime_ns] if stat else [path.name, None, None])
    return files


def missing_shards(index: dict, directory: Path) -> list[str]:
    """The names of the shard files ``index`` lists that are not in ``directory``."""
    return [name for name, size, _ in shard_files(index, directory) if size is None]


def _discard_incomplete_index(index_path: Path, missing: list[str]) -> None:
    """Remove the index of a cache that lacks the shards ``missing`` it lists, so that it is rebuilt.

    Raises:
        ValueError: the index cannot be removed, naming the folder to delete.
    """
    directory = index_path.parent
    logger.warning("latent cache %s lacks %d shard(s) its index lists (%s); it is rebuilt", directory,
                   len(missing), ", ".join(missing[:3]))
    try:
        index_path.unlink()
    except OSError as error:
        raise ValueError(f"the latent cache at {directory} lacks shards its {INDEX_FILE} lists "
                         f"({', '.join(missing[:3])}) and that index cannot be removed to rebuild it ({error}); "
                         f"delete the folder {directory}, or choose another latent_cache folder") from None


def sizes_outside(grids, pixels_per_token: int, buckets: AspectRatioBuckets) -> list[tuple[int, int]]:
    """The image sizes (height, width) in pixels of token ``grids`` (h, w) that are not among ``buckets``'
    sizes: cached tokens cannot be resized into them."""
    sizes = {(height * pixels_per_token, width * pixels_per_token) for height, width in grids}
    return sorted(sizes - set(buckets.sizes))


def in_source_order(index: dict) -> bool:
    """Whether the cache of ``index`` serves source sample ``i`` as its sample ``i``: it records its samples'
    source indices (``sample_order``) and holds every one, or records each it dropped (``dropped_samples``),
    so that a run reads the same batches from it as from the images."""
    dropped = index.get("dropped_samples", [])
    return (index.get("sample_order") == SOURCE_ORDER and isinstance(dropped, list)
            and index.get("num_samples", 0) + len(dropped) == index.get("num_source_samples"))


def _sizes_outside_buckets(index: dict, buckets: dict) -> list[str]:
    """For an index without ``built_from``: a phrase naming the cached image sizes (height, width) that
    are not among the buckets ``buckets`` (`cache_description`'s settings) make, if any."""
    try:
        run_buckets = AspectRatioBuckets(**buckets)
        outside = sizes_outside((tuple(shard["grid"]) for shard in index["shards"]), int(index["pixels_per_token"]),
                                run_buckets)
    except (KeyError, TypeError, ValueError):
        return []
    if not outside:
        return []
    return [f"buckets: images of (height, width) {outside} in pixels there, not among the buckets "
            f"{sorted(run_buckets.sizes)} here (another resolution, multi_aspect or grid_multiple)"]


def _what_differs(index: dict, encoder: str, description: dict | None, num_samples: int, source: str) -> list[str]:
    """What the cache of ``index`` was built from and this build (``description``, `cache_description`; its
    data described by ``source``) differs in: the encoder, the dataset, the buckets, the number of samples,
    as 'what: there, here' phrases; an index without ``built_from`` adds a phrase saying that its dataset
    and buckets could not be compared, and a difference found in ``source`` alone is named as such."""
    recorded = index.get("tokenizer_fingerprint")
    found = [] if recorded in (None, encoder) else [("the image tokenizer's encoder fingerprint", recorded, encoder)]
    there, here = index.get("built_from"), description or {}
    if isinstance(there, dict):
        found += [difference for part in ("buckets", "dataset") if part in there and part in here
                  for difference in plain_differences(part, there[part], here[part])]
    found += plain_differences("samples", index.get("num_source_samples"), num_samples)
    differing = [differences_phrase(found, most=len(found))] if found else []
    if not isinstance(there, dict):
        if "buckets" in here:
            differing.extend(_sizes_outside_buckets(index, here["buckets"]))
        differing.append("the dataset and the buckets (resolution, multi_aspect, grid_multiple) it was built "
                         "from are not recorded in its index, which predates that record")
    elif not differing:
        differing.append(differences_phrase([("the description of its data (fingerprint)", index.get("fingerprint"),
                                              _with_source(encoder, source))]))
    return differing


def _existing_cache_matches(index: dict, index_path: Path, tokenizer: torch.nn.Module, encoder: str,
                            candidate_source: str, source: str, num_samples: int, description: dict | None) -> bool:
    """Whether the complete cache whose ``index`` was read from ``index_path`` holds the latents of this
    encoder (fingerprint ``encoder``) of the data described by ``candidate_source``; a matching index
    in an older form (format 1, another description of the same data, no ``tokenizer_fingerprint``,
    no or another ``built_from``) is rewritten in the current form, under ``source`` and ``description``
    (`cache_description`; None leaves ``built_from`` as it is)."""
    if index.get("num_source_samples") != num_samples:
        return False
    if index.get("format_version", 1) >= 2:
        encoded_by = encoder
    else:
        encoded_by = _whole_module_fingerprint(tokenizer)
    if index.get("fingerprint") != _with_source(encoded_by, candidate_source):
        return False
    current = {"format_version": FORMAT_VERSION, "fingerprint": _with_source(encoder, source),
               "tokenizer_fingerprint": encoder}
    if description is not None:
        current["built_from"] = description
    if any(index.get(key) != value for key, value in current.items()):
        index.update(current)
        try:
            atomic_write_text(index_path, json.dumps(index, indent=1) + "\n")
            logger.info("latent cache %s: index rewritten in format %d", index_path.parent, FORMAT_VERSION)
        except OSError as error:  # a read-only cache still serves
            logger.warning("latent cache %s: its index could not be rewritten in format %d (%s)",
                           index_path.parent, FORMAT_VERSION, error)
    return True


def latent_cache_ready(tokenizer: ImageTokenizer, dataset: ImageTextDataset, directory: str | Path,
                       source: str = "", former_sources: tuple[str, ...] = (),
                       description: dict | None = None, unfingerprinted_sources: tuple[str, ...] = ()) -> bool:
    """Whether ``directory`` holds the complete cache of ``dataset`` through this tokenizer's encoder
    (False: there is none yet, build it); a cache of another encoder, dataset or buckets raises.

    A cache that lacks shards its index lists is incomplete: its index is removed (with a warning) and
    False returned, so that it is rebuilt.

    Args:
        tokenizer: the image tokenizer whose encoder the cache must hold.
        dataset: the image-caption pairs it must hold.
        directory: the cache folder.
        source: the description of the dataset and buckets, as for `build_latent_cache`.
        former_sources: other descriptions of the same data a cache may have been built under;
            a cache found under one has its index rewritten under ``source``.
        description: what the cache is built from (`cache_description`), recorded in a matching
            index that lacks it and compared with a refused one's to name what differs.
        unfingerprinted_sources: the descriptions the cache had before datasets of its kind were
            fingerprinted (`ImageTextDataset.content_fingerprint`): a cache built under one is kept
            (its contents cannot be compared), with a warning, and its index rewritten under ``source``.

    Raises:
        ValueError: a complete cache built from another tokenizer encoder, dataset or buckets (naming
            what differs, with the values there and here), an unreadable index, or the index of a
            cache missing shards that cannot be removed.
    """
    directory = Path(directory)
    index_path = directory / INDEX_FILE
    if not index_path.is_file():
        return False
    index = read_index(index_path)
    missing = missing_shards(index, directory)
    if missing:
        _discard_incomplete_index(index_path, missing)
        return False
    encoder = tokenizer_fingerprint(tokenizer)  # hashes the encoder: only when needed
    known = dict.fromkeys((source, *former_sources))
    candidates = [(each, False) for each in known] + [(each, True) for each in dict.fromkeys(unfingerprinted_sources)
                                                       if each not in known]
    for candidate_source, unfingerprinted in candidates:
        if not _existing_cache_matches(index, index_path, tokenizer, encoder, candidate_source, source, len(dataset),
                                       description):
            continue
        if unfingerprinted:
            logger.warning("latent cache %s was built before its dataset's samples were fingerprinted: kept as "
                           "built from the samples served now (remove it to rebuild, if the dataset's generator or "
                           "files changed since it was built)", directory)
        return True
    differing = _what_differs(index, encoder, description, len(dataset), source)
    raise ValueError(
        f"the latent cache at {directory} was built from another tokenizer encoder or dataset, or for other "
        f"buckets, than this one ({'; '.join(differing)}); to keep both caches, choose another latent_cache "
        f"folder (data.latent_cache) for this one; deleting {directory} rebuilds it here, and the cache it "
        "holds now is lost"
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
    described_dataset: dict | None = None,
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
        described_dataset: the dataset's description as JSON data (a recipe gives its spec as the
            dataset reads it), recorded in the index beside the bucket settings so that a refused
            cache names what differs; None records the buckets only.

    Returns:
        the cache folder.

    Raises:
        ValueError: ``batch_size`` or ``shard_size`` below 1; buckets of another pixels per
            token than the tokenizer's; a cache of another encoder, dataset or buckets already there.
    """
    require_count("batch_size", batch_size)
    require_count("shard_size", shard_size)
    kind = sample_kind_of(dataset)
    if kind != "text_to_image":
        raise ValueError(f"{dataset.describe()} holds {kind} samples; latent caches store image-caption pairs "
                         "only, so train them from images (leave data.latent_cache empty)")
    if buckets.pixels_per_token != tokenizer.pixels_per_token:
        raise ValueError(
            f"the buckets fit images to a grid of {buckets.pixels_per_token} pixels per token, but the image "
            f"tokenizer makes one token per {tokenizer.pixels_per_token} pixels; expected buckets with "
            f"pixels_per_token={tokenizer.pixels_per_token}, found {buckets.pixels_per_token}"
        )
    directory = Path(directory)
    description = cache_description(buckets, described_dataset)
    if latent_cache_ready(tokenizer, dataset, directory, source, description=description):
        return directory
    if tokenizer.samples_latents:
        logger.warning("the image tokenizer samples its latents: the cache keeps one sample per image, where "
                       "encoding during training would draw a new one every step")
    encoder = tokenizer_fingerprint(tokenizer)
    index_path = directory / INDEX_FILE
    directory.mkdir(parents=True, exist_ok=True)
    tracker = BadSampleTracker(max_bad_fraction, getattr(dataset, "scanned", len(dataset)),
                               getattr(dataset, "known_bad", []))
    groups: dict[tuple[int, int], list[int]] = {}
    dropped: list[dict] = []
    for index in range(len(dataset)):
        groups.setdefault(buckets.assign(*dataset.image_size(index)), []).append(index)
    tokenizer = tokenizer.to(device).eval()
    shards = []
    from tqdm import tqdm

    bar = tqdm(total=len(dataset), disable=not progress, unit="img", desc="latent cache")
    for (height, width), indices in sorted(groups.items()):
        pending_tokens, pending_keys, pending_captions, pending_sources = [], [], [], []
        for start in range(0, len(indices), batch_size):
            samples, loaded = [], []
            for index in indices[start:start + batch_size]:
                try:
                    samples.append(dataset.load(index))
                except CorruptSampleError as error:
                    tracker.update(1, [f"{error.key} ({error.reason})"])
                    dropped.append(_dropped_sample(dataset, index, error, (height, width), buckets.pixels_per_token))
                    continue
                loaded.append(index)
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
            # A sampled posterior: each image's sample seeded by its index, the same on every build (whatever
            # the batch size, or the samples dropped beside it).
            latents = tokenizer.encode_in_own_precision(batch.images.to(device), loaded)
            tokens = tokenizer.patchify(latents).float().cpu()  # (B, N, D)
            pending_tokens.append(tokens)
            pending_keys.extend(batch.keys)
            pending_captions.extend(batch.captions)
            pending_sources.extend(loaded)
            while sum(t.shape[0] for t in pending_tokens) >= shard_size:
                shards.append(_flush(directory, len(shards), pending_tokens, pending_keys, pending_captions,
                                     pending_sources, (height, width), buckets.pixels_per_token, shard_size))
        if pending_keys:
            shards.append(_flush(directory, len(shards), pending_tokens, pending_keys, pending_captions,
                                 pending_sources, (height, width), buckets.pixels_per_token, None))
    bar.close()
    index = {
        "format_version": FORMAT_VERSION,
        "fingerprint": _with_source(encoder, source),
        "tokenizer_fingerprint": encoder,
        "built_from": description,
        "sample_order": SOURCE_ORDER,
        "num_source_samples": len(dataset),
        "scanned_samples": getattr(dataset, "scanned", len(dataset)),
        "num_samples": sum(s["count"] for s in shards),
        "pixels_per_token": buckets.pixels_per_token,
        "token_dim": int(tokenizer.token_dim),
        "bad_samples": sorted(tracker.bad),
        "dropped_samples": sorted(dropped, key=lambda entry: entry["source_index"]),
        "shards": shards,
    }
    atomic_write_text(index_path, json.dumps(index, indent=1) + "\n")
    return directory


def _dropped_sample(dataset: ImageTextDataset, index: int, error: CorruptSampleError, size: tuple[int, int],
                    pixels_per_token: int) -> dict:
    """The index's entry for source sample ``index``, which could not be read (``error``) and belongs to the
    bucket ``size`` (height, width): its source index, key, reason, token grid (h, w) and, when the dataset
    knows it without the image, its caption."""
    entry = {"source_index": index, "key": error.key, "reason": error.reason,
             "grid": [size[0] // pixels_per_token, size[1] // pixels_per_token]}
    try:
        entry["caption"] = dataset.caption(index)
    except CorruptSampleError:
        pass
    return entry


def _flush(directory: Path, number: int, pending_tokens: list, keys: list, captions: list, sources: list,
           size: tuple[int, int], pixels_per_token: int, limit: int | None) -> dict:
    """Write the first ``limit`` (all, when None) pending rows of tokens (n, N, D) of images of
    ``size`` (height, width), with their keys, captions and indices in the source dataset, as shard
    ``number``; returns its entry of the index.

    Raises:
        ValueError: N is not the number of cells of the grid ``size`` makes at ``pixels_per_token``.
    """
    tokens = torch.cat(pending_tokens)
    count = tokens.shape[0] if limit is None else limit
    name = f"shard-{number:05d}.safetensors"
    grid = (size[0] // pixels_per_token, size[1] // pixels_per_token)
    if grid[0] * grid[1] != tokens.shape[1]:
        raise ValueError(
            f"{size[0]}x{size[1]} images at {pixels_per_token} pixels per token make a {grid[0]}x{grid[1]} grid: "
            f"expected {grid[0] * grid[1]} tokens per image, found {tokens.shape[1]} from the image tokenizer"
        )
    metadata = {"keys": json.dumps(keys[:count]), "captions": json.dumps(captions[:count]),
                "source_indices": json.dumps(sources[:count]), "grid": json.dumps(list(grid))}
    with atomic_path(directory / name) as tmp:
        save_file({"tokens": tokens[:count].contiguous()}, str(tmp), metadata=metadata)
    rest = tokens[count:]
    pending_tokens[:] = [rest] if rest.shape[0] else []
    del keys[:count], captions[:count], sources[:count]
    return {"file": name, "count": int(count), "grid": list(grid)}


def open_shard(path: Path):
    """``safe_open`` of the shard at ``path`` (a context manager, and a handle to read it with).

    Raises:
        ValueError: a file that cannot be read as safetensors, naming it and how to rebuild the cache.
    """
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as error:
        raise ValueError(
            f"latent cache shard {path} cannot be read ({error}): the cache at {path.parent} is damaged; delete "
            f"{path.parent / INDEX_FILE} (or the whole folder) so that the next run with data.latent_cache (or "
            "build_latent_cache) rebuilds it") from None


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
    """Samples with cached tokens (no images): keys, captions, tokens (N, D) and grids, in the order of
    their indices in the source dataset (in shard order for a cache that predates their record).

    A sample the build could not read (recorded in the index's ``dropped_samples``) is a sample here too,
    at its source index, whose `load` raises `CorruptSampleError` as reading its image did: the loader
    replaces it by the next readable sample of its bucket, as in a run from the images.

    Attributes:
        known_bad: the samples that could not be read while the cache was built, so that training
            counts them against its limit as it would when reading the images.
        scanned: how many samples the build looked at.
        pixels_per_token: side in pixels of the square one cached token covers.
        token_dim: D, the width of a cached token.
        tokenizer_fingerprint: `tokenizer_fingerprint` of the encoder that made the tokens, or
            None for a cache written before indexes recorded it.
        source_indices: each sample's index in the source dataset, or None for a cache written
            before shards recorded them.
        locations: each sample's (shard number, row), None for a sample the build could not read.
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
        self.index = read_index(index_path)
        self.directory = directory
        self.pixels_per_token = int(self.index["pixels_per_token"])
        self.fingerprint = self.index["fingerprint"]
        self.tokenizer_fingerprint: str | None = self.index.get("tokenizer_fingerprint")
        self.known_bad: list[str] = list(self.index.get("bad_samples", []))
        self.scanned = int(self.index.get("scanned_samples", self.index.get("num_source_samples", 0)))
        rows = self._shard_rows()
        recorded = all(row[0] is not None for row in rows)
        self._unreadable: dict[int, str] = {}  # reason by sample index, which is the source index here
        if recorded and self.in_source_order:
            for entry in self.index.get("dropped_samples", []):
                self._unreadable[entry["source_index"]] = entry["reason"]
                rows.append((entry["source_index"], None, entry["key"], entry.get("caption"), tuple(entry["grid"])))
        if recorded:
            rows.sort(key=lambda row: row[0])
        self.source_indices: list[int] | None = [row[0] for row in rows] if recorded else None
        self.locations: list[tuple[int, int] | None] = [row[1] for row in rows]
        self.keys: list[str] = [row[2] for row in rows]
        self.captions: list[str | None] = [row[3] for row in rows]
        self.grids: list[tuple[int, int]] = [row[4] for row in rows]
        self.token_dim = self._token_dim()
        self._handles: dict[int, object] = {}

    def _shard_rows(self) -> list[tuple]:
        """Every cached sample in shard order, as (source index or None, (shard number, row), key, caption,
        token grid (h, w)), from the shards' metadata.

        Raises:
            FileNotFoundError: a shard the index lists is missing, saying how to rebuild the cache.
            ValueError: a shard cannot be read (`open_shard`), or holds another count or grid of tokens than
                the index lists for it.
        """
        rows = []
        for number, shard in enumerate(self.index["shards"]):
            path = self.directory / shard["file"]
            if not path.is_file():
                raise FileNotFoundError(self._missing_shard_message(path))
            with open_shard(path) as handle:
                metadata = handle.metadata()
                shape = tuple(handle.get_slice("tokens").get_shape())
            keys, captions = json.loads(metadata["keys"]), json.loads(metadata["captions"])
            grid = shard.get("grid")
            expected = (shard.get("count"), *([grid[0] * grid[1]] if grid else []))
            if shape[:len(expected)] != expected or len(keys) != shape[0]:
                raise ValueError(
                    f"latent cache shard {path} holds tokens of shape {shape} for {len(keys)} keys, but "
                    f"{self.directory / INDEX_FILE} lists {shard.get('count')} samples of a {grid} grid there: "
                    "the shard is not the one the index was written with (another build wrote into this folder); "
                    "delete the folder and build the cache again")
            sources = json.loads(metadata["source_indices"]) if "source_indices" in metadata else [None] * len(keys)
            rows.extend((source, (number, row), key, caption, tuple(shard["grid"]))
                        for row, (source, key, caption) in enumerate(zip(sources, keys, captions)))
        return rows

    def _missing_shard_message(self, path: Path) -> str:
        """What to do about the shard at ``path``, which the index lists and the folder lacks."""
        dataset = (self.index.get("built_from") or {}).get("dataset")
        spec = dataset.get("spec") if isinstance(dataset, dict) else None
        built_by = f", dataset {json.dumps(spec, sort_keys=True)}" if spec else ""
        return (f"latent cache shard {path} is missing, though {self.directory / INDEX_FILE} lists it: the cache at "
                f"{self.directory} is incomplete. Rebuild it: run the recipe that built it again (data.latent_cache "
                f"{self.directory.parent}{built_by}), which rebuilds a cache missing shards, or call "
                "nextstep.training.build_latent_cache with the dataset it was built from")

    @property
    def in_source_order(self) -> bool:
        """Whether sample ``i`` is sample ``i`` of the source dataset (`in_source_order`): a run then reads
        the same batches as from the images."""
        return in_source_order(self.index)

    def _token_dim(self) -> int | None:
        """D as the index records it, else as the first shard's tokens (n, N, D) have it (None: no shard)."""
        if "token_dim" in self.index:
            return int(self.index["token_dim"])
        if not self.index["shards"]:
            return None
        with open_shard(self.directory / self.index["shards"][0]["file"]) as handle:
            return int(handle.get_slice("tokens").get_shape()[-1])

    def check_tokenizer(self, tokenizer: ImageTokenizer, fingerprint: str | None = None) -> None:
        """Refuse to serve ``tokenizer`` (a model's image tokenizer) tokens another encoder made.

        Compares the token width, the pixels per token and the encoder's fingerprint. A cache written
        before indexes recorded the encoder alone is compared on what it holds; an encoder that cannot
        be told apart from it is named in a warning.

        Args:
            tokenizer: the image tokenizer the cached tokens stand in for.
            fingerprint: ``tokenizer_fingerprint(tokenizer)``, when known (hashed here otherwise).

        Raises:
            ValueError: naming each value expected (the tokenizer's) and found (the cache's).
        """
        differing = []
        if self.token_dim is not None and self.token_dim != tokenizer.token_dim:
            differing.append(f"token width: expected {tokenizer.token_dim}, found {self.token_dim}")
        if self.pixels_per_token != tokenizer.pixels_per_token:
            differing.append(f"pixels per token: expected {tokenizer.pixels_per_token}, found {self.pixels_per_token}")
        unchecked = [] if self.token_dim is not None else ["its token width (it holds no tokens)"]
        if not differing:
            fingerprint = fingerprint or tokenizer_fingerprint(tokenizer)
            if self.tokenizer_fingerprint is not None:
                if self.tokenizer_fingerprint != fingerprint:
                    differing.append(f"encoder fingerprint: expected {fingerprint}, found {self.tokenizer_fingerprint}")
            elif self.fingerprint != (fingerprint if self.index.get("format_version", 1) >= 2
                                      else _whole_module_fingerprint(tokenizer)):
                # Written before the encoder was recorded alone, with its fingerprint mixed with the data's.
                unchecked.append("its encoder (the index predates tokenizer_fingerprint)")
        if differing:
            raise ValueError(
                f"the latent cache at {self.config.path} holds tokens of another image tokenizer than the model's "
                f"({'; '.join(differing)}); build a cache with the model's image tokenizer, or train the model "
                "whose tokenizer built it")
        if unchecked:
            logger.warning("the latent cache at %s could not be checked against the model's image tokenizer for %s; "
                           "rebuilding it records what is needed", self.config.path, " and ".join(unchecked))

    def __len__(self) -> int:
        return len(self.keys)

    def _handle(self, number: int):
        if number not in self._handles:
            self._handles[number] = open_shard(self.directory / self.index["shards"][number]["file"])
        return self._handles[number]

    def load(self, index: int) -> ImageTextSample:
        if self.locations[index] is None:
            raise CorruptSampleError(self.keys[index], self._unreadable[index])
        number, row = self.locations[index]
        tokens = self._handle(number).get_slice("tokens")[row:row + 1][0].clone()
        return ImageTextSample(key=self.keys[index], caption=self.captions[index], tokens=tokens,
                               grid=self.grids[index])

    def caption(self, index: int) -> str:
        if self.captions[index] is None:  # a dropped sample whose caption the build could not read either
            self.load(index)
        return self.captions[index]

    def image_size(self, index: int) -> tuple[int, int]:
        height, width = self.grids[index]
        return (width * self.pixels_per_token, height * self.pixels_per_token)

    def check_buckets(self, buckets) -> None:
        """Cached tokens are not resized: each cached grid must be one of the run's buckets."""
        outside = sizes_outside(set(self.grids), self.pixels_per_token, buckets)
        if outside:
            raise ValueError(
                f"the latent cache at {self.config.path} holds images of (height, width) {outside} in pixels, "
                f"which are not among this run's buckets {sorted(buckets.sizes)}; cached tokens cannot be "
                "resized: train with the resolution, multi_aspect and grid_multiple the cache was built with, "
                "or build a cache for these buckets")

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}  # file handles do not travel to loader workers
        return state
