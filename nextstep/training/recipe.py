"""Recipes: one JSON file naming the model, the data and the training numbers.

A recipe looks like::

    {
      "model": "tiny",
      "data": {"datasets": [{"type": "shapes", "num_samples": 20000}], "resolution": 64},
      "train": {"max_steps": 2000, "micro_batch_size": 32, "learning_rate": 1e-3}
    }

`run_recipe` builds everything and trains; ``nextstep train`` calls it. Under
``torchrun`` every process runs the same call. A finished run writes its model
(the weight average, when the run keeps one) to ``<run folder>/model``;
`nextstep.training.export.export_model` does the same for any checkpoint.
"""

from __future__ import annotations

import inspect
import itertools
import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from nextstep.config import ComponentSpec, Config, differences_phrase, plain_data, plain_differences, require
from nextstep.io import atomic_write_text, names_a_path, read_json_object, what_is_at
from nextstep.training.config import TrainConfig
from nextstep.training.data.source import DataConfig

if TYPE_CHECKING:
    from nextstep.model import NextStep

logger = logging.getLogger("nextstep.training")

RECIPE_FILE = "recipe.json"
#: Folder of a finished run's model (the weight average when the run keeps one).
MODEL_DIR = "model"
#: Folders of a finished tokenizer run: the trained tokenizer and its held-out evaluation.
TOKENIZER_DIR = "tokenizer"
EVALUATION_DIR = "eval"
#: Which start model a preference run trains against (`record_reference_model`).
REFERENCE_FILE = "reference_model.json"
#: How a run reads its datasets, images or latent caches (`record_latent_caches`).
LATENT_CACHE_RECORD_FILE = "latent_caches.json"
#: What a run started over (``--no-resume``) sets aside besides the run's own entries: the recipe and the
#: outputs of either kind of run (a folder may have held the other kind).
EARLIER_RUN_OUTPUTS = (RECIPE_FILE, MODEL_DIR, TOKENIZER_DIR, EVALUATION_DIR, REFERENCE_FILE,
                       LATENT_CACHE_RECORD_FILE)


#: Model config fields a recipe may change for its run (``training_settings``): the ones only
#: training reads. A dotted name is a field of a nested config.
TRAINING_SETTINGS = ("text_loss_weight", "image_loss_weight", "image_first_probability",
                     "word_vectors.substitution_probability")


#: Settings of preference training a recipe may give (`PreferenceTask`'s arguments).
PREFERENCE_SETTINGS = ("beta", "sft_weight")


def flat_settings(settings: dict, prefix: str = "") -> dict:
    """``{"word_vectors": {"substitution_probability": 0.4}}`` -> ``{"word_vectors.substitution_probability": 0.4}``
    (dotted names pass through).

    Raises:
        ValueError: a name outside `TRAINING_SETTINGS`.
    """
    flat = {}
    for name, value in settings.items():
        if isinstance(value, dict):
            flat.update(flat_settings(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    unknown = sorted(set(flat) - set(TRAINING_SETTINGS))
    if unknown:
        raise ValueError(f"training_settings may set {list(TRAINING_SETTINGS)}; found {unknown}")
    return flat


@dataclass
class RecipeConfig(Config):
    """A whole training run.

    Args:
        model: a model preset name (``tiny``, ``nextstep_1_large``) or a saved
            model directory to continue from.
        model_arguments: keyword arguments of the preset function (for
            ``nextstep_1_large``: ``{"tokenizer_path": "/path/to/qwen2.5"}``).
        model_seed: seed of a preset's random initialisation.
        image_tokenizer: a trained VAE (a folder or file in any layout
            ``nextstep.tokenizers.vae_checkpoints.load_flux_vae`` reads) that
            replaces the model's image tokenizer; its token width must match.
        text_tokenizer: a text tokenizer spec without ``kind`` (for example
            ``{"type": "word", "min_count": 2}``) that replaces the model's before
            training: fitted to the run's captions (`TextTokenizer.fit`), with the
            embeddings carried over (`nextstep.retokenize.replace_text_tokenizer`).
        training_settings: the model's training-time settings to change for this
            run (`TRAINING_SETTINGS`), nested like the model config, e.g.
            ``{"word_vectors": {"substitution_probability": 0.4}}``; they are saved
            with the trained model.
        preference: train by preference optimisation instead
            (`nextstep.training.preference.PreferenceTask`) with these settings,
            e.g. ``{"beta": 500}``; the data must be preference pairs. Empty (the
            default) trains the ordinary NextStep loss.
        data: the training data.
        train: the optimiser, schedule, batch, logging and checkpoint settings.
    """

    model: str = "tiny"
    model_arguments: dict = field(default_factory=dict)
    model_seed: int = 0
    image_tokenizer: str = ""
    text_tokenizer: dict = field(default_factory=dict)
    training_settings: dict = field(default_factory=dict)
    preference: dict = field(default_factory=dict)
    data: DataConfig = field(default_factory=lambda: DataConfig(datasets=({"type": "shapes"},)))
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        require(bool(self.model), "model", self.model, "a preset name or a model directory")
        require(isinstance(self.model_arguments, dict), "model_arguments", self.model_arguments, "a mapping")
        require(isinstance(self.text_tokenizer, dict) and (not self.text_tokenizer or "type" in self.text_tokenizer),
                "text_tokenizer", self.text_tokenizer, "a mapping with a 'type' key, or empty")
        if self.text_tokenizer:
            self.text_tokenizer_spec()  # an unknown type or key fails when the recipe loads, not after the data
        require(isinstance(self.training_settings, dict), "training_settings", self.training_settings, "a mapping")
        flat_settings(self.training_settings)  # an unknown name fails when the recipe loads
        require(isinstance(self.preference, dict) and set(self.preference) <= set(PREFERENCE_SETTINGS),
                "preference", self.preference, f"a mapping with keys among {list(PREFERENCE_SETTINGS)}")
        for name, value in self.preference.items():
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            require(number and (value > 0 if name == "beta" else value >= 0), f"preference.{name}", value,
                    "a number > 0" if name == "beta" else "a number >= 0")
        require(not (self.preference and self.train.pack_length), "train.pack_length", self.train.pack_length,
                "None for preference training (pairs are read one per row)")
        require(not (self.preference and self.train.text_dropout), "train.text_dropout", self.train.text_dropout,
                "None or 0 for preference training (pairs train the caption-first sequence, each image under "
                "its caption)")

    def text_tokenizer_spec(self) -> ComponentSpec:
        """``text_tokenizer`` as a component spec (its type and fields checked)."""
        return ComponentSpec.from_dict({**self.text_tokenizer, "kind": "text_tokenizer"})


def recipe_search_paths() -> list[Path]:
    """Folders searched for recipes given by name: ``./recipes`` and the source tree's ``recipes/``."""
    return [Path.cwd() / "recipes", Path(__file__).resolve().parents[2] / "recipes"]


def find_recipe(name_or_path: str) -> Path:
    """The recipe file for a path or a bare name (``tiny_emoji_shapes``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if names_a_path(name_or_path):
        raise FileNotFoundError(f"expected a recipe file at {name_or_path}, found {what_is_at(path)}")
    known = []
    for folder in recipe_search_paths():
        candidate = folder / f"{name_or_path}.json"
        if candidate.is_file():
            return candidate
        if folder.is_dir():
            known.extend(p.stem for p in folder.glob("*.json"))
    if path.is_dir():  # no recipe of that name: the folder was meant
        raise FileNotFoundError(f"expected a recipe file at {name_or_path}, found a directory")
    raise FileNotFoundError(
        f"no recipe named {name_or_path!r} in {[str(p) for p in recipe_search_paths()]}; "
        f"known: {sorted(set(known))}"
    )


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (values parsed as JSON, else taken as text) to a recipe dict.

    A number after a list's key picks an item (``data.datasets.0.path=...``); a key
    missing from the recipe is added (the recipe's own check then names a wrong one).

    Raises:
        ValueError: an item without ``=``, or a path through a value that is neither
            an object nor a list, or past a list's end, naming the path.
    """
    data = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"an override must look like 'train.max_steps=100', found {item!r}")
        dotted, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        keys = dotted.split(".")
        target: Any = data
        for depth, key in enumerate(keys):
            where = ".".join(keys[:depth]) or "the recipe"
            if isinstance(target, list):
                if not key.isdigit() or int(key) >= len(target):
                    raise ValueError(f"override {dotted!r}: {where} is a list of {len(target)}, expected an index "
                                     f"below {len(target)}, found {key!r}")
                key = int(key)
            elif not isinstance(target, dict):
                raise ValueError(f"override {dotted!r}: {where} is {target!r}, not an object or a list")
            if depth == len(keys) - 1:
                target[key] = value
            else:
                if isinstance(target, dict) and target.get(key) is None:
                    target[key] = {}  # a section the recipe leaves out or sets to null
                target = target[key]
    return data


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> RecipeConfig:
    """Read a recipe and apply overrides; unknown keys raise ``ValueError`` naming them."""
    path = find_recipe(name_or_path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"recipe {path} is not valid JSON: {error}") from error
    except UnicodeDecodeError as error:
        raise ValueError(f"recipe {path} is not UTF-8 text, as a recipe is: {error}") from error
    return RecipeConfig.from_dict(apply_overrides(data, overrides or []))


def recipe_model_source(recipe: RecipeConfig):
    """What `build_recipe_model` builds the recipe's model from, checked without loading it: the model
    directory (a `Path`), or the preset (a function taking the recipe's ``model_arguments``).

    Raises:
        FileNotFoundError: a ``model`` written as a path with no model directory there.
        ValueError: a name that is no preset, or ``model_arguments`` the preset does not take.
    """
    from nextstep.registry import model_preset

    path = Path(recipe.model)
    if path.is_dir():
        return path
    if names_a_path(recipe.model):
        raise FileNotFoundError(f"recipe model: expected a model directory or a preset name at {recipe.model!r}, "
                                f"found {what_is_at(path)}")
    preset = model_preset(recipe.model)
    try:
        inspect.signature(preset).bind(**recipe.model_arguments)
    except TypeError as error:  # an argument the preset does not take
        raise ValueError(f"model_arguments {sorted(recipe.model_arguments)} do not fit the preset "
                         f"{recipe.model!r}: {error}") from None
    return preset


def recipe_generation_defaults(recipe: RecipeConfig):
    """The sampling defaults (`GenerationDefaults`) of the model a recipe starts from, read from its config
    without loading its weights: a preset's with the recipe's ``model_arguments``, a saved model's
    ``config.json``, or the release's own for a release directory."""
    from nextstep.interop.release_config import RELEASE_GENERATION

    return _recipe_model_part(recipe, "generation", RELEASE_GENERATION)


def recipe_sampler(recipe: RecipeConfig):
    """The default sampler (a `ComponentSpec`) of the model a recipe starts from, read as
    `recipe_generation_defaults` reads its sampling defaults (a release directory's: the first release's)."""
    from nextstep.interop.release_config import release_sampler

    return _recipe_model_part(recipe, "sampler", release_sampler(None))


def _recipe_model_part(recipe: RecipeConfig, part: str, release_part):
    """The field ``part`` of the start model's `ModelConfig`, without its weights; ``release_part`` for a
    release directory."""
    from nextstep.builders import model_config_part

    return model_config_part(recipe_model_source(recipe), part, release_part, **recipe.model_arguments)


def build_recipe_model(recipe: RecipeConfig):
    """The NextStep model a recipe starts from."""
    from nextstep.builders import build_model
    from nextstep.model import NextStep

    source = recipe_model_source(recipe)
    if isinstance(source, Path):
        model = NextStep.from_pretrained(source)
    else:
        model = build_model(source(**recipe.model_arguments), seed=recipe.model_seed)
    if recipe.image_tokenizer:
        from nextstep.tokenizers.vae_checkpoints import load_flux_vae

        tokenizer = load_flux_vae(recipe.image_tokenizer)
        if tokenizer.token_dim != model.token_dim:
            raise ValueError(
                f"image_tokenizer {recipe.image_tokenizer} makes {tokenizer.token_dim}-d tokens but the model "
                f"expects {model.token_dim}-d ones"
            )
        model.image_tokenizer = tokenizer.requires_grad_(False)
    if recipe.training_settings:
        apply_training_settings(model, recipe.training_settings)
    return model


def apply_training_settings(model, settings: dict) -> None:
    """Change ``model``'s training-time settings in place: ``settings`` maps names from
    `TRAINING_SETTINGS` (nested or dotted: ``"word_vectors.substitution_probability"``) to new
    values, which the model config validates."""
    config = model.config
    for name, value in flat_settings(settings).items():
        section, _, field_name = name.rpartition(".")
        if not section:
            config = config.replace(**{field_name: value})
        elif section == "word_vectors" and model.word_vectors is None:
            raise ValueError(f"training_settings sets {name} but the model has no word vectors "
                             "(add them with `nextstep add-word-vectors`)")
        else:
            config = config.replace(**{section: getattr(config, section).replace(**{field_name: value})})
    model.config = config
    if model.word_vectors is not None:
        model.word_vectors.config = config.word_vectors


def recipe_text_tokenizer(recipe: RecipeConfig, data):
    """The text tokenizer ``recipe.text_tokenizer`` names, fitted to every caption of ``data``
    (repeated datasets count once per repeat; a sample that cannot be read, and whose dataset cannot give
    its caption without it, is left out)."""
    from nextstep.builders import build_component
    from nextstep.training.data import CorruptSampleError

    spec = recipe.text_tokenizer_spec()

    def captions():  # read only by tokenizers that learn from them
        if data.streaming:
            raise ValueError(f"a {spec.type} text tokenizer is fitted to the captions of map-style data; "
                             "found a streaming dataset")
        dataset = data.dataset
        for index in range(len(dataset)):
            try:
                yield dataset.caption(index)
            except CorruptSampleError:
                continue

    return build_component(spec).fit(captions())


def recipe_cache_folder(config: DataConfig, number: int) -> Path:
    """The folder under ``config.latent_cache`` that caches dataset ``number`` of ``config``
    (``<latent_cache>/<number>-<type>``)."""
    return Path(config.latent_cache) / f"{number:02d}-{config.datasets[number]['type']}"


def recipe_training_data(recipe: RecipeConfig, model, context=None, show_progress: bool = False):
    """The recipe's `TrainingData`; with ``data.latent_cache`` set, each dataset is encoded
    once into ``<latent_cache>/<number>-<type>`` (by rank 0) and read from there (a ``latent_cache``
    dataset already holds tokens: it is read as it is).

    A cache is found by its dataset's spec as the dataset reads it (defaults spelt out, ``repeat``
    aside) or, for caches built before, as the recipe spells it.

    Raises:
        ValueError: a ``latent_cache`` dataset whose tokens another image tokenizer made
            (`LatentCacheDataset.check_tokenizer`) or whose images are not among the run's buckets;
            a cache there of another encoder, dataset or buckets.
    """
    from nextstep.training.data.base import ImageTextDataset, sample_kind_of
    from nextstep.training.data.latent_cache import (
        INDEX_FILE,
        LatentCacheConfig,
        LatentCacheDataset,
        build_latent_cache,
        cache_description,
        latent_cache_ready,
        tokenizer_fingerprint,
    )
    from nextstep.training.data.source import TrainingData, build_datasets, combine
    from nextstep.training.distributed import DistributedContext

    context = context or DistributedContext()
    config = recipe.data
    buckets = config.buckets(model.image_tokenizer.pixels_per_token)
    datasets, repeats = build_datasets(config)
    kinds = sorted({sample_kind_of(dataset) for dataset in datasets})
    if recipe.preference and kinds != ["preference"]:  # before any cache is built or the run folder written
        raise ValueError(f"a preference recipe trains on preference pairs (a chosen and a rejected image), "
                         f"found {' and '.join(kinds)} data; use a preference dataset such as preference_manifest")
    cached_already = [dataset for dataset in datasets if isinstance(dataset, LatentCacheDataset)]
    if cached_already:
        fingerprint = tokenizer_fingerprint(model.image_tokenizer)
        for dataset in cached_already:
            dataset.check_tokenizer(model.image_tokenizer, fingerprint)
            dataset.check_buckets(buckets)  # before the run folder is written
    to_encode = [number for number, dataset in enumerate(datasets) if not isinstance(dataset, LatentCacheDataset)]
    if cached_already and to_encode and not config.latent_cache:  # a batch draws from every dataset
        raise ValueError(
            f"data.datasets mixes latent_cache datasets (tokens) with datasets of images "
            f"({', '.join(repr(config.datasets[number].get('type')) for number in to_encode)}) and a batch cannot "
            "hold both; set data.latent_cache to encode those too, or train on one kind")
    if not config.latent_cache or not to_encode:
        return TrainingData(combine(datasets, repeats), buckets)
    if any(getattr(d, "streaming", False) for d in datasets):
        raise ValueError("data.latent_cache works with map-style datasets, not with webdataset streams")
    # The main process fills the cache and the others wait for its files: they must see the same folder.
    context.check_shared_folder(config.latent_cache, "data.latent_cache")
    folders = [recipe_cache_folder(config, number) for number in to_encode]
    sources, as_spelt, descriptions, unfingerprinted = [], [], [], []
    for number in to_encode:
        spec, contents = config.datasets[number], datasets[number].content_fingerprint()  # what it serves
        read_as = {k: v for k, v in _comparable_dataset(spec).items() if k != "repeat"}
        spelt = {k: v for k, v in spec.items() if k != "repeat"}
        rest = f" {buckets}" + (f" {contents}" if contents else "")
        sources.append(json.dumps(read_as, sort_keys=True) + rest)
        as_spelt.append(json.dumps(spelt, sort_keys=True) + rest)
        descriptions.append({"spec": read_as, **({"contents": contents} if contents else {})})
        # Datasets digested by their samples were once described by their spec alone.
        sampled = type(datasets[number]).content_fingerprint is ImageTextDataset.content_fingerprint
        unfingerprinted.append(tuple(json.dumps(form, sort_keys=True) + f" {buckets}" for form in (read_as, spelt))
                               if sampled else ())
    # Rank 0 checks the caches first and every process learns of a refused one: the others would
    # otherwise wait at the barrier below for a rank that stopped.
    refused, ready = None, []
    if context.is_main:
        try:
            ready = [latent_cache_ready(model.image_tokenizer, datasets[number], folder, source, (spelt,),
                                        cache_description(buckets, described), unfingerprinted_sources=before)
                     for number, folder, source, spelt, described, before
                     in zip(to_encode, folders, sources, as_spelt, descriptions, unfingerprinted)]
        except ValueError as error:
            refused = str(error)
    refused = context.broadcast_object(refused)
    if refused is not None:
        raise ValueError(refused)
    if context.is_main:
        for number, folder, source, described, built in zip(to_encode, folders, sources, descriptions, ready):
            if built:  # checked above: not hashed again
                continue
            build_latent_cache(model.image_tokenizer, datasets[number], buckets, folder, device=context.device,
                               max_bad_fraction=recipe.train.max_bad_fraction, progress=show_progress,
                               source=source, described_dataset=described)
    else:
        # Encoding can outlast a collective's timeout: wait for the finished indexes instead.
        while not all((folder / INDEX_FILE).is_file() for folder in folders):
            time.sleep(2.0)
    context.barrier()
    cached = list(datasets)
    for number, folder in zip(to_encode, folders):
        cached[number] = LatentCacheDataset(LatentCacheConfig(str(folder)))
    return TrainingData(combine(cached, repeats), buckets)


def latent_cache_record(recipe: RecipeConfig) -> dict:
    """How the run of ``recipe`` reads each of its datasets, as `check_latent_caches` compares it when the
    run resumes (read after `recipe_training_data` built its caches).

    Returns:
        ``{"latent_cache": data.latent_cache, "datasets": [...]}``, one entry per dataset spec, with its
        ``type`` and: for a ``latent_cache`` dataset its folder (``path``) with its index's ``fingerprint`` and
        ``num_samples`` and its shard files (``shard_files``,
        `nextstep.training.data.latent_cache.shard_files`); for another, the cache folder it is read from
        (``read_from``, None: its images) and whether that serves sample ``i`` of the dataset as its sample
        ``i`` (``source_order``), so that the batches are those of the images.
    """
    from nextstep.training.data.latent_cache import INDEX_FILE, in_source_order, read_index, shard_files

    config, entries = recipe.data, []
    for number, spec in enumerate(config.datasets):
        entry: dict = {"type": spec.get("type")}
        if spec.get("type") == "latent_cache":
            index_path = Path(spec["path"]) / INDEX_FILE
            index = read_index(index_path) if index_path.is_file() else {}
            entry.update(path=spec["path"], fingerprint=index.get("fingerprint"), num_samples=index.get("num_samples"),
                         shard_files=shard_files(index, Path(spec["path"])))
        elif config.latent_cache:
            folder = recipe_cache_folder(config, number)
            index = read_index(folder / INDEX_FILE) if (folder / INDEX_FILE).is_file() else {}
            entry.update(read_from=str(folder), source_order=in_source_order(index))
        else:
            entry.update(read_from=None, source_order=True)
        entries.append(entry)
    return {"latent_cache": config.latent_cache, "datasets": entries}


def reads_latent_caches(recipe: RecipeConfig) -> bool:
    """Whether the run of ``recipe`` reads any latent cache (``data.latent_cache``, or a ``latent_cache`` dataset)."""
    return bool(recipe.data.latent_cache) or any(spec.get("type") == "latent_cache" for spec in recipe.data.datasets)


def record_latent_caches(recipe: RecipeConfig, output_dir: Path, here: dict | None = None) -> None:
    """Write how the run reads its datasets (``here``, default `latent_cache_record`) into the run folder, for
    `check_latent_caches` when the run resumes: when it reads a latent cache, or keeps an earlier
    record current (a run that reads images only needs none: its recipe says how it read them)."""
    path = output_dir / LATENT_CACHE_RECORD_FILE
    if reads_latent_caches(recipe) or path.is_file():
        atomic_write_text(path, json.dumps(here or latent_cache_record(recipe), indent=2) + "\n")


def _saved_latent_cache_record(output_dir: Path) -> dict | None:
    """How the run in ``output_dir`` read its datasets: its record (`record_latent_caches`), or for a run
    without one whose ``recipe.json`` reads no latent cache, its images (entries of ``latent_cache``
    datasets left empty: not compared); None when neither tells."""
    path = output_dir / LATENT_CACHE_RECORD_FILE
    if path.is_file():
        return read_json_object(path, "latent cache record")
    try:
        saved = _recipe_or_none((output_dir / RECIPE_FILE).read_text(), RecipeConfig)
    except OSError:
        return None
    if saved is None or saved.data.latent_cache:
        return None
    return {"latent_cache": "", "datasets": [
        {} if spec.get("type") == "latent_cache" else {"type": spec.get("type"), "read_from": None,
                                                       "source_order": True}
        for spec in saved.data.datasets]}


def _read_from(entry: dict) -> str:
    """Where a `latent_cache_record` entry says a dataset was read from, in words."""
    if entry.get("read_from") is None:
        return "its images"
    order = "" if entry.get("source_order") else (
        " (in another order than the dataset's: built before caches recorded their samples' source indices, "
        "or the samples they could not read)")
    return f"the latent cache {entry['read_from']}{order}"


def _same_batches(there: dict, here: dict) -> bool:
    """Whether a dataset read as the `latent_cache_record` entry ``there`` says and as ``here`` says gives
    the same batches: both in the dataset's own order, or both from one cache in its order."""
    if there.get("source_order") and here.get("source_order"):
        return True
    return there.get("read_from") == here.get("read_from") and there.get("source_order") == here.get("source_order")


def check_latent_caches(recipe: RecipeConfig, output_dir: Path, has_checkpoint: bool,
                        here: dict | None = None) -> None:
    """Refuse to resume the run in ``output_dir`` when its data would reach the steps in other batches than
    before: a ``latent_cache`` dataset whose cache changed since (another fingerprint or sample count, unless
    its shard files are those the run began with: its index alone was rewritten), or
    a ``data.latent_cache`` turned on, off or moved between a cache and images (or another cache) that
    order the samples differently. What a run from before the record (`record_latent_caches`) read
    from a cache, or another recipe's datasets (`check_resumable` names them), is not compared.

    ``here``: how this run reads its datasets (default `latent_cache_record`).

    Raises:
        ValueError: naming the dataset, what differs (there and here) and what to do.
    """
    saved = _saved_latent_cache_record(output_dir) if has_checkpoint else None
    if saved is None:
        return
    there_entries, here = saved.get("datasets"), here or latent_cache_record(recipe)
    if not isinstance(there_entries, list) or len(there_entries) != len(here["datasets"]):
        return
    problems, advice = [], RESUME_ADVICE
    for number, (there, now) in enumerate(zip(there_entries, here["datasets"])):
        if not isinstance(there, dict) or there.get("type") != now["type"]:
            continue
        if now["type"] == "latent_cache":
            if there.get("path") != now["path"]:
                continue
            if there.get("shard_files") and there["shard_files"] == now["shard_files"] \
                    and there.get("num_samples") == now["num_samples"]:
                continue  # an index rewritten alone: its shard files hold the same samples
            changed = [f"{name} {there.get(name)} there, {now[name]} here" for name in ("fingerprint", "num_samples")
                       if there.get(name) != now[name]]
            if changed:
                problems.append(f"dataset {number}: the latent cache at {now['path']} changed since the run began "
                                f"({', '.join(changed)}), so it holds other samples")
        elif not _same_batches(there, now):
            problems.append(f"dataset {number} ({now['type']}) was read from {_read_from(there)} there and from "
                            f"{_read_from(now)} here, so the resumed steps would train on other batches")
            advice = (f"resume with data.latent_cache={json.dumps(saved.get('latent_cache', ''))} as the run had it, "
                      f"or {RESUME_ADVICE}")
    if problems:
        raise ValueError(f"{output_dir} cannot continue with this data: {'; '.join(problems)}; {advice}")


#: Recipe fields a resumed run must share with the run it continues (its ``train`` settings may change:
#: the trainer checks the seed and the global batch itself); ``data.latent_cache`` may move, as long as
#: the batches stay the same (`check_latent_caches`).
RESUMED_FIELDS = ("model", "model_arguments", "model_seed", "image_tokenizer", "text_tokenizer",
                  "training_settings", "preference", "data")


#: What a refused resume suggests by default.
RESUME_ADVICE = "pass --no-resume (resume=False) to set that run aside and start over"


def _holds_results(path: Path) -> bool:
    """Whether an entry of a run folder holds what a run made: a log with a row below its header, a folder
    with something in it, any other file (a run that stopped before its first step leaves only headers)."""
    if path.is_dir():
        return any(path.iterdir())
    if not path.is_file():
        return False
    if path.suffix == ".csv":  # a row below the header: the second non-blank line, read no further
        with path.open("rb") as log:
            return next(itertools.islice((line for line in log if line.strip()), 1, None), None) is not None
    return True


def check_resumable(recipe: Config, output_dir: Path, has_checkpoint: bool, *,
                    fields: tuple[str, ...] = RESUMED_FIELDS, run_entries: tuple[str, ...] = ()) -> None:
    """Refuse to continue the run in ``output_dir`` with ``recipe`` before anything is written there.

    Args:
        recipe: the recipe of this call (saved as ``recipe.json`` once the run continues).
        output_dir: the run folder.
        has_checkpoint: whether it holds a checkpoint to resume from
            (`nextstep.training.checkpointing.CheckpointManager.holds_checkpoint`).
        fields: top-level recipe fields that must equal those of the saved ``recipe.json``.
        run_entries: names an earlier run leaves (its log, samples, model): with no checkpoint
            beside them there is nothing to resume, and starting over would overwrite them.

    Raises:
        ValueError: the folder holds a run of another recipe (naming the fields), or a run
            without a checkpoint; both suggest ``--no-resume``, which sets the earlier run aside.
    """
    if not has_checkpoint:
        found = sorted(name for name in run_entries if _holds_results(output_dir / name))
        if found:
            raise ValueError(f"{output_dir} holds an earlier run ({', '.join(found)}) but no checkpoint to resume "
                             "from; pass --no-resume (resume=False) to move it into earlier-runs/ and start over, "
                             "or choose another output folder")
        return
    check_same_recipe(recipe, output_dir, fields, advice=f"resume it with its own recipe ({output_dir / RECIPE_FILE}), "
                                                         f"or {RESUME_ADVICE}")


def check_same_recipe(recipe: Config, output_dir: Path, fields: tuple[str, ...] = RESUMED_FIELDS, *,
                      advice: str = RESUME_ADVICE) -> None:
    """Refuse ``recipe`` for the run in ``output_dir`` when the fields ``fields`` of its saved
    ``recipe.json`` (if any) differ from ``recipe``'s, naming them and giving ``advice``.

    Both are compared as ``recipe``'s class reads them (a field the saved file leaves out takes its
    default; ``training_settings`` nested or dotted alike; ``data.latent_cache`` aside). A saved file
    this class cannot read is not compared.
    """
    saved_file = output_dir / RECIPE_FILE
    if not saved_file.is_file():
        return
    try:
        text = saved_file.read_text()
    except OSError:
        text = ""  # read as no recipe, below
    saved = _recipe_or_none(text, type(recipe))
    if saved is None:
        other = _other_recipe_class_reading(text, type(recipe))
        if other is not None:
            raise ValueError(f"{output_dir} holds a run of another kind (its {RECIPE_FILE} is a {other.__name__}, "
                             f"this recipe a {type(recipe).__name__}); {advice}")
        logger.warning("%s cannot be read as a %s; it is not compared with this run's recipe", saved_file,
                       type(recipe).__name__)
        return
    saved, here = _comparable(saved), _comparable(recipe)
    # Arguments of another preset than the saved one's say nothing more than the preset's name.
    compared = [name for name in fields if name != "model_arguments" or saved.get("model") == here.get("model")]
    differing = [difference for name in compared
                 for difference in plain_differences(name, saved.get(name), here.get(name))]
    if differing:
        raise ValueError(f"{output_dir} was trained with another recipe ({differences_phrase(differing)}); {advice}")


#: Model config fields a checkpoint may hold otherwise than the model a resumed run builds: the sampling
#: defaults (the run sets their size) and the text tokenizer (its files move into each checkpoint; the
#: recipe's ``text_tokenizer`` is compared with the recipe).
UNCOMPARED_MODEL_FIELDS = ("generation", "text_tokenizer")
#: Fields of any component's config that a run's ``train`` settings set and a resume may change.
RUN_SET_MODEL_FIELDS = ("gradient_checkpointing",)


def check_checkpoint_model(model: NextStep, checkpoint: Path | None, model_source: str) -> None:
    """Refuse to resume from ``checkpoint`` a model configured otherwise than the one that wrote it: the
    recipe's model (``model_source``: a folder saved again, or a preset whose defaults changed) builds
    another model now, whose training would not go on as the run began.

    Both configs are compared as `ModelConfig` reads them (fields a file leaves out take their
    defaults), `UNCOMPARED_MODEL_FIELDS` and `RUN_SET_MODEL_FIELDS` aside; a checkpoint config this
    version cannot read is not compared.

    Raises:
        ValueError: naming the fields that differ, with the values there and here.
    """
    from nextstep.model_config import ModelConfig
    from nextstep.serialization import CONFIG_NAME

    if checkpoint is None or not (checkpoint / CONFIG_NAME).is_file():
        return
    try:
        saved = ModelConfig.load(checkpoint / CONFIG_NAME).to_dict()
    except (ValueError, TypeError, KeyError, OSError):
        return
    here = model.current_config().to_dict()
    differing = [difference for key in sorted(set(saved) | set(here)) if key not in UNCOMPARED_MODEL_FIELDS
                 for difference in plain_differences(key, saved.get(key), here.get(key))
                 if difference[0].rsplit(".", 1)[-1] not in RUN_SET_MODEL_FIELDS]
    if differing:
        raise ValueError(f"{checkpoint} was written by a model configured otherwise than the one the recipe's model "
                         f"{model_source!r} builds now ({differences_phrase(differing)}); resume with the model "
                         f"the run began with, or {RESUME_ADVICE}")


def _recipe_or_none(text: str, recipe_class: type) -> Config | None:
    """The recipe ``text`` as ``recipe_class`` reads it, or None when it does not."""
    try:
        return recipe_class.from_json(text)
    except (ValueError, TypeError):
        return None


def _other_recipe_class_reading(text: str, own: type) -> type | None:
    """The recipe class other than ``own`` (model or tokenizer training) that reads the recipe ``text``,
    or None."""
    from nextstep.training.tokenizer_recipe import TokenizerRecipeConfig

    return next((recipe_class for recipe_class in (RecipeConfig, TokenizerRecipeConfig)
                 if recipe_class is not own and _recipe_or_none(text, recipe_class) is not None), None)


def _comparable(recipe: Config) -> dict:
    """A recipe's plain data, as two spellings of the same recipe give it alike."""
    data = recipe.to_dict()
    if isinstance(data.get("data"), dict):
        data["data"] = {key: value for key, value in data["data"].items() if key != "latent_cache"}
        if isinstance(data["data"].get("datasets"), list):
            data["data"]["datasets"] = [_comparable_dataset(spec) for spec in data["data"]["datasets"]]
    if isinstance(data.get("training_settings"), dict):
        data["training_settings"] = flat_settings(data["training_settings"])
    if isinstance(data.get("model_arguments"), dict):
        data["model_arguments"] = _comparable_model_arguments(data.get("model"), data["model_arguments"])
    for name in ("model", "image_tokenizer"):  # a folder however it is spelt (./run/model, an absolute path)
        if isinstance(data.get(name), str) and Path(data[name]).exists():
            data[name] = str(Path(data[name]).resolve())
    if isinstance(data.get("model"), str) and Path(data["model"]).is_dir():
        data.pop("model_seed", None)  # the seed of a preset's random weights: a saved model has its own
    if isinstance(data.get("text_tokenizer"), dict) and data["text_tokenizer"]:
        try:  # its fields left at their defaults spelt out
            data["text_tokenizer"] = recipe.text_tokenizer_spec().to_dict()
        except (ValueError, TypeError, AttributeError):
            pass
    return data


def _comparable_model_arguments(model: Any, arguments: dict) -> dict:
    """A preset's ``model_arguments`` with those left out spelt out at the preset's defaults (those of a
    model directory, or of a name no preset has, as written)."""
    from nextstep.registry import model_preset

    if not isinstance(model, str) or Path(model).is_dir():
        return arguments
    try:
        parameters = inspect.signature(model_preset(model)).parameters.values()
    except ValueError:
        return arguments
    defaults = {parameter.name: plain_data(parameter.default) for parameter in parameters
                if parameter.default is not inspect.Parameter.empty
                and parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    return {**defaults, **arguments}


def _comparable_dataset(spec: dict) -> dict:
    """A dataset spec as its dataset config reads it: fields left at their default spelt out, and
    ``repeat`` 1 when left out (a spec no dataset reads stays as written)."""
    from nextstep.training.data.registry import dataset_config
    from nextstep.training.data.source import split_repeat

    fields, repeat = split_repeat(spec)
    try:
        _, config = dataset_config(fields)
    except ValueError:
        return spec
    return {"type": fields["type"], **config.to_dict(), "repeat": repeat}


def check_reference_model(recipe: RecipeConfig, output_dir: Path, has_checkpoint: bool,
                          found: str | None = None) -> None:
    """Refuse to resume a preference run whose start model (its reference) is no longer the one it began
    with: the files at the recipe's ``model`` changed since (`nextstep.pretrained.model_fingerprint`;
    ``found``, when the caller has it already).

    Raises:
        ValueError: naming the model and both fingerprints.
    """
    from nextstep.pretrained import model_fingerprint

    saved = read_json_object(output_dir / REFERENCE_FILE) if (output_dir / REFERENCE_FILE).is_file() else None
    if not has_checkpoint or saved is None or saved.get("model") != recipe.model:
        return  # nothing to resume, a run from before the record, or another model (check_resumable names it)
    found = found or model_fingerprint(recipe.model)
    if saved.get("fingerprint") != found:
        raise ValueError(
            f"{output_dir} began preference training against {recipe.model} as it was then (fingerprint "
            f"{saved.get('fingerprint')}), and the files there have changed since (fingerprint {found}): the "
            f"resumed run's reference model would be another; put that model back, or {RESUME_ADVICE}")


def record_reference_model(recipe: RecipeConfig, output_dir: Path, found: str | None = None) -> None:
    """Write which start model (its `nextstep.pretrained.model_fingerprint`, ``found`` when the caller has it
    already) a preference run trains against, for `check_reference_model` when the run resumes."""
    from nextstep.pretrained import model_fingerprint

    record = {"model": recipe.model, "fingerprint": found or model_fingerprint(recipe.model)}
    atomic_write_text(output_dir / REFERENCE_FILE, json.dumps(record, indent=2) + "\n")


def open_run_folder(trainer, recipe: Config, *, resume: bool, run_entries: tuple[str, ...],
                    fields: tuple[str, ...] = RESUMED_FIELDS,
                    check_checkpoint: Callable[[Path | None], None] | None = None) -> None:
    """Before a run writes into its folder: every process checks that the run there can continue with
    ``recipe`` (`check_resumable`, when ``resume``, then ``check_checkpoint`` with the latest checkpoint
    or None), all wait for each other, the latest checkpoint is restored (its own refusals: seed, global
    batch, stream split), and only then the main process saves ``recipe`` as the folder's
    ``recipe.json``. A refused run leaves the folder as it was."""
    output_dir, context = trainer.output_dir, trainer.context
    if resume:
        check_resumable(recipe, output_dir, trainer.checkpoints.holds_checkpoint(), fields=fields,
                        run_entries=run_entries)
        if check_checkpoint is not None:
            check_checkpoint(trainer.checkpoints.latest())
    context.barrier()  # no process writes into the folder before every process has looked at it
    if resume:
        trainer.resume()
    if context.is_main:
        recipe.save(output_dir / RECIPE_FILE)


def run_recipe(recipe: RecipeConfig, output_dir: str | Path, *, resume: bool = True,
               show_progress: bool = True, model: NextStep | None = None):
    """Train a recipe; returns the `Trainer` after the run.

    Args:
        recipe: what to train.
        output_dir: logs, samples and checkpoints go here (a rerun with the same
            folder resumes from its latest checkpoint).
        resume: set False to ignore existing checkpoints.
        show_progress: draw the progress bar.
        model: the model ``build_recipe_model(recipe)`` gave, when the caller built it already
            (preference rounds draw with it first); it is trained in place. None builds it.
    """
    from nextstep.pretrained import model_fingerprint
    from nextstep.training.checkpointing import is_sharded
    from nextstep.training.distributed import DistributedContext
    from nextstep.training.export import export_model
    from nextstep.training.text_to_image import TextToImageTask
    from nextstep.training.trainer import LOG_FILE, RUN_ENTRIES, SAMPLES_DIR, Trainer, set_aside_earlier_run

    output_dir = Path(output_dir)
    context = DistributedContext.from_environment()
    try:
        model = build_recipe_model(recipe) if model is None else model
        # The model draws at the size it trains at unless told otherwise.
        side = recipe.data.resolution
        model.config = model.config.replace(generation=model.config.generation.replace(height=side, width=side))
        data = recipe_training_data(recipe, model, context, show_progress)
        if recipe.text_tokenizer:
            from nextstep.retokenize import replace_text_tokenizer

            replace_text_tokenizer(model, recipe_text_tokenizer(recipe, data))
            logger.info("text tokenizer: %s, %d ids", recipe.text_tokenizer["type"],
                        model.text_tokenizer.vocab_size)
        if context.is_main and not resume:  # starting over: the earlier run's recipe and outputs go aside too
            set_aside_earlier_run(output_dir, RUN_ENTRIES + EARLIER_RUN_OUTPUTS)
        if recipe.preference:
            from nextstep.training.preference import PreferenceTask

            task = PreferenceTask.from_train_config(model, recipe.train, **recipe.preference)
        else:
            task = TextToImageTask.from_train_config(model, recipe.train)
        trainer = Trainer(task, data, recipe.train, output_dir, context=context, show_progress=show_progress)
        reading = latent_cache_record(recipe)  # how this run reads its data, checked and then recorded
        reference = model_fingerprint(recipe.model) if recipe.preference else None
        if resume:
            has_checkpoint = trainer.checkpoints.holds_checkpoint()
            if recipe.preference:  # the reference is the start model: a resumed run needs the same one
                check_reference_model(recipe, output_dir, has_checkpoint, reference)
            check_latent_caches(recipe, output_dir, has_checkpoint, reading)
        open_run_folder(trainer, recipe, resume=resume, run_entries=(LOG_FILE, SAMPLES_DIR, MODEL_DIR),
                        check_checkpoint=lambda latest: check_checkpoint_model(model, latest, recipe.model))
        if context.is_main and recipe.preference:
            record_reference_model(recipe, output_dir, reference)
        if context.is_main:
            record_latent_caches(recipe, output_dir, reading)
            logger.info("training on %s", data.describe())
        trainer.fit(resume=resume)
        if context.is_main and is_sharded(model):  # FSDP: the last checkpoint holds the whole model
            export_model(trainer.checkpoints.latest(), output_dir / MODEL_DIR, use_ema=trainer.ema is not None)
        elif context.is_main:
            averaged = trainer.ema.applied_to(model) if trainer.ema is not None else nullcontext(model)
            with averaged:
                model.save_pretrained(output_dir / MODEL_DIR)
        if context.is_main:
            logger.info("model: %s", output_dir / MODEL_DIR)
        return trainer
    finally:
        context.shutdown()
