"""Rare paths of recipes, latent caches, webdataset shards, configs, files and the command line: bad input is
refused naming what was expected and what was found, and the fallbacks keep what they promise."""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import torch
from PIL import Image
from test_data_emoji import pytestmark as needs_emoji
from test_data_fashion_mnist import pytestmark as needs_fashion_mnist
from test_data_webdataset import _samples_of_named_members, write_shards
from test_training_latent_cache import build, small_vae

from nextstep.config import Config
from nextstep.training.data import AspectRatioBuckets, LatentCacheDataset, ShapesConfig, ShapesDataset
from nextstep.training.data.latent_cache import LatentCacheConfig, cache_description, latent_cache_ready
from nextstep.training.recipe import RecipeConfig


def _index(folder: Path) -> dict:
    return json.loads((folder / "index.json").read_text())


def _write_index(folder: Path, index: dict) -> None:
    (folder / "index.json").write_text(json.dumps(index))


def _deny(monkeypatch, method: str, name: str) -> None:
    """``Path.<method>`` raises PermissionError for files called ``name`` and works for the others."""
    original = getattr(Path, method)

    def denied(path, *args, **kwargs):
        if path.name == name:
            raise PermissionError(13, "Permission denied", str(path))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(Path, method, denied)


def _small_shapes() -> ShapesDataset:
    """The dataset `build` caches."""
    return ShapesDataset(ShapesConfig(num_samples=6, size=16))


# ------------------------------------------------------------------ recipes
def test_a_latent_cache_over_a_webdataset_stream_is_refused(tmp_path, tiny_model):
    from nextstep.training.recipe import recipe_training_data

    pattern = write_shards(tmp_path / "shards", num_shards=1, per_shard=2)
    recipe = RecipeConfig.from_dict({"data": {"datasets": [{"type": "webdataset", "shards": [pattern]}],
                                              "resolution": 32, "latent_cache": str(tmp_path / "cache")}})
    with pytest.raises(ValueError, match=r"^data\.latent_cache works with map-style datasets, not with webdataset "
                                         r"streams$"):
        recipe_training_data(recipe, tiny_model)
    assert not (tmp_path / "cache").exists()


def test_a_release_directory_generates_with_the_release_s_defaults(tmp_path):
    from nextstep.interop.release_config import RELEASE_GENERATION
    from nextstep.training.recipe import recipe_generation_defaults

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "nextstep"}))
    assert recipe_generation_defaults(RecipeConfig(model=str(tmp_path))) == RELEASE_GENERATION


def _images_recipe(tmp_path, **data) -> RecipeConfig:
    return RecipeConfig.from_dict({"data": {"datasets": [{"type": "shapes", "num_samples": 4}], **data}})


_FROM_A_CACHE = {"latent_cache": "/elsewhere", "datasets": [
    {"type": "shapes", "read_from": "/elsewhere/00-shapes", "source_order": False}]}


def test_a_run_without_a_record_is_compared_only_when_its_recipe_read_images(tmp_path):
    """The saved recipe stands in for the record when it read no latent cache; an unreadable or absent one, or one
    that read a cache, tells nothing and nothing is compared."""
    from nextstep.training.recipe import check_latent_caches

    recipe = _images_recipe(tmp_path)
    check_latent_caches(recipe, tmp_path, True, _FROM_A_CACHE)  # no recipe.json
    (tmp_path / "recipe.json").write_text("[1, 2]")
    check_latent_caches(recipe, tmp_path, True, _FROM_A_CACHE)
    _images_recipe(tmp_path, latent_cache=str(tmp_path / "cache")).save(tmp_path / "recipe.json")
    check_latent_caches(recipe, tmp_path, True, _FROM_A_CACHE)
    recipe.save(tmp_path / "recipe.json")
    with pytest.raises(ValueError, match=r"dataset 0 \(shapes\) was read from its images there and from "):
        check_latent_caches(recipe, tmp_path, True, _FROM_A_CACHE)


def _record(tmp_path, *entries) -> None:
    (tmp_path / "latent_caches.json").write_text(json.dumps({"latent_cache": "", "datasets": list(entries)}))


def _cache_entry(path="/caches/a", fingerprint="f1", num_samples=4, shard_files=(("shard-0", 1),)):
    return {"type": "latent_cache", "path": path, "fingerprint": fingerprint, "num_samples": num_samples,
            "shard_files": [list(item) for item in shard_files]}


def test_a_record_of_another_number_of_datasets_is_not_compared(tmp_path):
    from nextstep.training.recipe import check_latent_caches

    recipe, rebuilt = _images_recipe(tmp_path), _cache_entry(fingerprint="f2", shard_files=(("shard-0", 2),))
    _record(tmp_path, _cache_entry(fingerprint="f1"), _cache_entry(path="/caches/b"))
    check_latent_caches(recipe, tmp_path, True, {"datasets": [rebuilt]})
    _record(tmp_path, _cache_entry(fingerprint="f1"))
    with pytest.raises(ValueError, match=r"the latent cache at /caches/a changed since the run began \(fingerprint "
                                         r"f1 there, f2 here\)"):
        check_latent_caches(recipe, tmp_path, True, {"datasets": [rebuilt]})


def test_a_latent_cache_dataset_moved_to_another_folder_is_left_to_the_recipe_comparison(tmp_path):
    from nextstep.training.recipe import check_latent_caches

    _record(tmp_path, _cache_entry(fingerprint="f1"))
    moved = _cache_entry(path="/caches/moved", fingerprint="f2", shard_files=(("shard-0", 2),))
    check_latent_caches(_images_recipe(tmp_path), tmp_path, True, {"datasets": [moved]})


def test_a_latent_cache_whose_shards_were_rewritten_with_the_same_samples_goes_on(tmp_path):
    from nextstep.training.recipe import check_latent_caches

    _record(tmp_path, _cache_entry(shard_files=(("shard-0", 1),)))
    check_latent_caches(_images_recipe(tmp_path), tmp_path, True,
                        {"datasets": [_cache_entry(shard_files=(("shard-0", 2),))]})


def test_a_saved_recipe_that_cannot_be_read_is_not_compared(tmp_path, monkeypatch, caplog):
    from nextstep.training.recipe import check_same_recipe

    RecipeConfig(model="other").save(tmp_path / "recipe.json")
    _deny(monkeypatch, "read_text", "recipe.json")
    with caplog.at_level("WARNING", logger="nextstep.training"):
        check_same_recipe(RecipeConfig(), tmp_path)
    assert "recipe.json cannot be read as a RecipeConfig; it is not compared" in caplog.text


def test_a_checkpoint_config_this_version_cannot_read_is_not_compared(tmp_path, tiny_model):
    from nextstep.training.recipe import check_checkpoint_model

    (tmp_path / "config.json").write_text('{"backbone": ')
    check_checkpoint_model(tiny_model, tmp_path, "tiny")
    (tmp_path / "config.json").write_text(json.dumps({"image_loss_weight": "heavy"}))
    check_checkpoint_model(tiny_model, tmp_path, "tiny")


def test_arguments_of_a_model_no_preset_has_are_compared_as_written(tmp_path):
    from nextstep.training.recipe import check_same_recipe

    RecipeConfig(model="nonesuch", model_arguments={"depth": 2}).save(tmp_path / "recipe.json")
    check_same_recipe(RecipeConfig(model="nonesuch", model_arguments={"depth": 2}), tmp_path)
    with pytest.raises(ValueError, match=r"another recipe \(model_arguments\.depth: 2 there, null here\); "):
        check_same_recipe(RecipeConfig(model="nonesuch"), tmp_path)


def test_a_rerun_spelling_the_same_recipe_otherwise_is_the_same_recipe(tmp_path, monkeypatch):
    from nextstep.training.recipe import check_same_recipe

    (tmp_path / "start").mkdir()  # a saved model's folder (only its path matters here)
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    RecipeConfig(model="start", text_tokenizer={"type": "word"}).save(run / "recipe.json")
    for same in (RecipeConfig(model="./start", text_tokenizer={"type": "word"}),  # another spelling of the folder
                 RecipeConfig(model=str(tmp_path / "start"), text_tokenizer={"type": "word"}),
                 RecipeConfig(model="start", model_seed=1, text_tokenizer={"type": "word"}),  # no preset to seed
                 RecipeConfig(model="start", text_tokenizer={"type": "word", "min_count": 2})):  # a default
        check_same_recipe(same, run)
    with pytest.raises(ValueError, match=r"text_tokenizer\.min_count: 2 there, 3 here"):
        check_same_recipe(RecipeConfig(model="start", text_tokenizer={"type": "word", "min_count": 3}), run)
    RecipeConfig(model="tiny").save(run / "recipe.json")
    with pytest.raises(ValueError, match=r"model_seed: 0 there, 1 here"):  # a preset's weights are its seed's
        check_same_recipe(RecipeConfig(model="tiny", model_seed=1), run)


def test_only_the_main_process_saves_the_recipe_into_the_run_folder(tmp_path):
    from types import SimpleNamespace

    from nextstep.training import DistributedContext
    from nextstep.training.recipe import open_run_folder

    for rank in (1, 0):
        trainer = SimpleNamespace(output_dir=tmp_path, context=DistributedContext(rank=rank, world_size=1))
        open_run_folder(trainer, RecipeConfig(model_seed=3), resume=False, run_entries=())
        assert (tmp_path / "recipe.json").is_file() == (rank == 0)
    assert RecipeConfig.load(tmp_path / "recipe.json").model_seed == 3


# ------------------------------------------------------------------ tokenizer recipes
def test_a_tokenizer_preset_without_overrides_is_the_preset_drawn_with_the_recipe_s_seed():
    from nextstep.presets import flux_vae_config
    from nextstep.tokenizers import FluxVAE
    from nextstep.training.tokenizer_recipe import TokenizerRecipeConfig, build_recipe_tokenizer

    tokenizer = build_recipe_tokenizer(TokenizerRecipeConfig(tokenizer="tiny", seed=5))
    torch.manual_seed(5)
    expected = FluxVAE(flux_vae_config("tiny"))
    assert tokenizer.config == expected.config
    for mine, theirs in zip(tokenizer.parameters(), expected.parameters()):
        assert torch.equal(mine, theirs)


def test_a_tokenizer_checkpoint_read_without_its_average_gives_none(tmp_path):
    from nextstep.tokenizers.vae_checkpoints import save_flux_vae
    from nextstep.training.tokenizer_recipe import TokenizerRecipeConfig, checkpoint_tokenizer

    vae = small_vae()
    save_flux_vae(vae, tmp_path / "step")
    tokenizer, average = checkpoint_tokenizer(tmp_path / "step", TokenizerRecipeConfig(), use_ema=False)
    assert average is None
    for mine, theirs in zip(tokenizer.parameters(), vae.parameters()):
        assert torch.equal(mine, theirs)


# ------------------------------------------------------------------ latent caches
def test_an_incomplete_cache_whose_index_cannot_be_removed_names_the_folder_to_delete(tmp_path, monkeypatch):
    vae = small_vae()
    folder = build(vae, tmp_path / "cache", shard_size=3)
    (folder / _index(folder)["shards"][1]["file"]).unlink()
    _deny(monkeypatch, "unlink", "index.json")
    with pytest.raises(ValueError, match=r"the latent cache at .*cache lacks shards its index\.json lists "
                                         r"\(shard-\d+\.safetensors\) and that index cannot be removed to rebuild it "
                                         r"\(\[Errno 13\] Permission denied: .*\); delete the folder .*cache, or "
                                         r"choose another latent_cache folder"):
        latent_cache_ready(vae, _small_shapes(), folder)
    assert (folder / "index.json").is_file()


def test_a_cache_of_an_older_index_is_refused_without_a_bucket_phrase_it_cannot_make(tmp_path):
    """An index that records neither what it was built from nor its pixels per token: the refusal says what it
    cannot compare, and names no bucket sizes (with no description given, none are compared)."""
    vae = small_vae()
    folder = build(vae, tmp_path / "cache", source="shapes")
    index = _index(folder)
    del index["built_from"], index["pixels_per_token"]
    _write_index(folder, index)
    other_buckets = cache_description(AspectRatioBuckets(32, vae.pixels_per_token, multi_aspect=False))
    for description in (None, other_buckets):
        with pytest.raises(ValueError, match=r"than this one \(the dataset and the buckets \(resolution, multi_aspect, "
                                             r"grid_multiple\) it was built from are not recorded in its index, which "
                                             r"predates that record\)"):
            latent_cache_ready(vae, _small_shapes(), folder, source="other", description=description)


def test_a_matching_cache_checked_without_a_description_keeps_the_one_it_records(tmp_path):
    vae = small_vae()
    folder = build(vae, tmp_path / "cache", source="shapes")
    recorded = _index(folder)["built_from"]
    assert recorded and latent_cache_ready(vae, _small_shapes(), folder, source="shapes")
    assert _index(folder)["built_from"] == recorded


def test_a_read_only_cache_whose_index_cannot_be_upgraded_still_serves(tmp_path, monkeypatch, caplog):
    from nextstep.training.data import latent_cache

    vae = small_vae()
    folder = build(vae, tmp_path / "cache", source="shapes")
    index = _index(folder)
    del index["tokenizer_fingerprint"]
    _write_index(folder, index)

    def refuse(path, text):
        raise PermissionError(30, "Read-only file system", str(path))

    monkeypatch.setattr(latent_cache, "atomic_write_text", refuse)
    with caplog.at_level("WARNING", logger="nextstep.training"):
        assert latent_cache_ready(vae, _small_shapes(), folder, source="shapes")
    assert "its index could not be rewritten in format 2 ([Errno 30] Read-only file system" in caplog.text
    assert "tokenizer_fingerprint" not in _index(folder)


def test_a_batch_of_unreadable_samples_only_is_skipped_and_its_samples_recorded(tmp_path, tiny_model):
    from test_latent_cache_integrity import _half_broken

    from nextstep.training import build_latent_cache
    from nextstep.training.data import CorruptSampleError

    build_latent_cache(tiny_model.image_tokenizer, _half_broken(), AspectRatioBuckets(32, multi_aspect=False),
                       tmp_path / "cache", batch_size=1, max_bad_fraction=0.5)
    cached = LatentCacheDataset(LatentCacheConfig(str(tmp_path / "cache")))
    assert len(cached) == 4 and cached.in_source_order and len(cached.known_bad) == 1
    with pytest.raises(CorruptSampleError, match="broken on purpose"):
        cached.load(1)
    assert [cached.load(i).grid for i in (0, 2, 3)] == [(2, 2)] * 3


def test_a_dataset_whose_samples_are_not_of_its_declared_kind_is_refused(tmp_path):
    from nextstep.training import build_latent_cache

    class Mislabelled(ShapesDataset):
        def load(self, index):
            sample = super().load(index)
            sample.rejected_image = sample.image
            return sample

    vae = small_vae()
    dataset = Mislabelled(ShapesConfig(num_samples=2, size=16))
    with pytest.raises(ValueError, match=r"holds editing or preference samples; latent caches store image-caption "
                                         r"pairs only"):
        build_latent_cache(vae, dataset, AspectRatioBuckets(16, vae.pixels_per_token, multi_aspect=False),
                           tmp_path / "cache")


def test_a_cache_index_without_a_token_width_reads_it_from_its_first_shard(tmp_path, tiny_model):
    from nextstep.training import build_latent_cache

    tokenizer = tiny_model.image_tokenizer
    folder = build_latent_cache(tokenizer, ShapesDataset(ShapesConfig(num_samples=2, size=32)),
                                AspectRatioBuckets(32, multi_aspect=False), tmp_path / "cache")
    index = _index(folder)
    del index["token_dim"]
    _write_index(folder, index)
    cached = LatentCacheDataset(LatentCacheConfig(str(folder)))
    assert cached.token_dim == tokenizer.token_dim == cached.load(0).tokens.shape[-1] != cached.load(0).tokens.shape[-2]


def test_a_cache_dataset_with_open_shards_pickles_and_reads_the_same_tokens(tmp_path):
    folder = build(small_vae(), tmp_path / "cache")
    cached = LatentCacheDataset(LatentCacheConfig(str(folder)))
    first = cached.load(0).tokens
    assert cached._handles
    copy = pickle.loads(pickle.dumps(cached))
    assert copy._handles == {} and torch.equal(copy.load(0).tokens, first)


# ------------------------------------------------------------------ webdataset shards
def test_tar_members_without_an_extension_belong_to_no_sample(tmp_path):
    samples = _samples_of_named_members(tmp_path / "x.tar", ["README", "a.png", "a.txt", "notes/LICENSE"])
    assert [(sample.key, sorted(sample.members)) for sample in samples] == [("a", ["png", "txt"])]


def test_fewer_shards_than_readers_are_refused_naming_both_counts(tmp_path):
    from nextstep.training.data import WebDataset, WebDatasetConfig

    dataset = WebDataset(WebDatasetConfig(shards=(write_shards(tmp_path, num_shards=2, per_shard=1),)))
    with pytest.raises(ValueError, match=r"^2 shards cannot feed 3 readers \(processes x loader workers\); write more "
                                         r"shards or use fewer workers$"):
        next(dataset.stream(0, 3, seed=0))


def test_a_first_batch_whose_pixels_all_fail_is_reported_with_the_next_batch(tmp_path):
    import itertools

    from nextstep.training.data import BatchLayout, WebDataset, WebDatasetConfig
    from nextstep.training.data.webdataset import StreamingTrainingBatches

    pattern = write_shards(tmp_path, num_shards=1, per_shard=6, truncated={"s0_000"})
    dataset = WebDataset(WebDatasetConfig(shards=(pattern,), shuffle_buffer=0))
    loader = StreamingTrainingBatches(dataset, AspectRatioBuckets(32, multi_aspect=False), BatchLayout(1))
    first, second = itertools.islice(iter(loader), 2)
    assert [key.split(":")[-1] for key in first.keys + second.keys] == ["s0_001", "s0_002"]
    assert len(first.bad_keys) == 1 and "s0_000" in first.bad_keys[0] and second.bad_keys == []


# ------------------------------------------------------------------ configs
@dataclass
class _Inner(Config):
    x: int = 0


@dataclass
class _Outer(Config):
    inner: None | _Inner = None
    mode: Literal["a", "b"] = "a"
    table: dict = field(default_factory=dict)
    where: Path = Path(".")


class _OddValue(ValueError):
    pass


@dataclass
class _SelfNamed(Config):
    odd: bool = False

    def validate(self) -> None:
        if self.odd:
            raise _OddValue("an odd value")
        raise ValueError("_SelfNamed: named already")


def test_an_optional_nested_config_written_none_first_is_read_from_its_mapping():
    assert _Outer.from_dict({"inner": {"x": 2}}).inner == _Inner(x=2)
    assert _Outer.from_dict({"inner": None}).inner is None


def test_config_fields_outside_their_literal_or_mapping_type_are_named():
    with pytest.raises(ValueError, match=r"^_Outer\.mode must be one of \['a', 'b'\], found str 'c'$"):
        _Outer(mode="c")
    with pytest.raises(ValueError, match=r"^_Outer\.table must be a mapping, found list \[1\]$"):
        _Outer(table=[1])
    assert _Outer(where=Path("x")).where == Path("x")  # a type the checks do not know passes as it is


def test_a_validation_error_already_named_or_of_its_own_type_is_raised_as_it_is():
    with pytest.raises(ValueError, match=r"^_SelfNamed: named already$"):
        _SelfNamed()
    with pytest.raises(_OddValue, match=r"^an odd value$"):
        _SelfNamed(odd=True)


def test_dataset_specs_given_as_one_mapping_are_refused_as_such():
    from nextstep.training.data.source import DataConfig

    with pytest.raises(ValueError, match=r"^DataConfig\.datasets must be .*, found dict \{'type': 'shapes'\}$"):
        DataConfig(datasets={"type": "shapes"})


# ------------------------------------------------------------------ files and images
def test_a_folder_that_cannot_be_opened_or_flushed_is_passed_over(tmp_path, monkeypatch):
    import os

    from nextstep.io import _fsync_dir

    assert _fsync_dir(tmp_path / "absent") is None
    closed = []
    real_close = os.close

    def fsync(fd):
        raise OSError(22, "Invalid argument")

    def close(fd):
        closed.append(fd)
        real_close(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "close", close)
    assert _fsync_dir(tmp_path) is None
    assert len(closed) == 1


def test_a_dangling_link_in_a_written_folder_is_moved_in_as_it_is(tmp_path):
    from nextstep.io import atomic_directory

    with atomic_directory(tmp_path / "out") as staging:
        (staging / "weights.bin").write_bytes(b"x")
        (staging / "latest").symlink_to("step-9")
    assert (tmp_path / "out" / "latest").is_symlink() and str((tmp_path / "out" / "latest").readlink()) == "step-9"


def test_a_folder_that_cannot_be_renamed_into_place_raises_and_leaves_nothing_there(tmp_path, monkeypatch):
    import os

    from nextstep.io import atomic_directory

    real_replace = os.replace

    def replace(source, target):
        if Path(target) == tmp_path / "out":
            raise OSError(18, "Invalid cross-device link")
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="Invalid cross-device link"):
        with atomic_directory(tmp_path / "out") as staging:
            (staging / "a.txt").write_text("a")
    assert not (tmp_path / "out").exists()


def test_an_exif_block_that_cannot_be_parsed_leaves_the_size_as_it_is():
    from nextstep.images import oriented_size

    image = Image.new("RGB", (4, 2))
    image.info["exif"] = b"garbage"
    assert oriented_size(image) == (4, 2)


@pytest.mark.parametrize("mode, colour, expected", [("L", 128, (128, 128, 128)),
                                                    ("CMYK", (0, 255, 255, 0), (255, 0, 0))])
def test_images_of_other_modes_without_transparency_convert_to_rgb(mode, colour, expected):
    from nextstep.images import to_rgb

    converted = to_rgb(Image.new(mode, (2, 2), colour))
    assert converted.mode == "RGB" and converted.getpixel((1, 1)) == expected


# ------------------------------------------------------------------ command line
def test_a_file_without_a_record_compares_as_none():
    from nextstep.cli import _requested

    assert _requested(None, {"model_fingerprint": "abc"}) is None


def test_eval_tokenizer_reads_a_checkpoint_folder_it_is_given(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import nextstep.evaluation.tokenizer_report as tokenizer_report
    from nextstep.cli import main
    from nextstep.tokenizers.vae_checkpoints import save_flux_vae

    vae = small_vae()
    save_flux_vae(vae, tmp_path / "vae")
    seen = []
    monkeypatch.setattr(tokenizer_report, "run_tokenizer_evaluation", lambda tokenizer, output, **kwargs: seen.append(
        tokenizer) or SimpleNamespace(to_markdown=lambda: ""))
    assert main(["eval-tokenizer", str(tmp_path / "vae"), "--output", str(tmp_path / "out")]) == 0
    (evaluated,) = seen
    assert evaluated.config == vae.config
    for mine, theirs in zip(evaluated.parameters(), vae.parameters()):
        assert torch.equal(mine, theirs)


def test_eval_passes_its_emoji_limit_and_settings_to_the_emoji_suite(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import nextstep.evaluation.emoji_eval as emoji_eval
    from nextstep.cli import main

    asked = {}

    class Suite:
        def __init__(self, **kwargs):
            asked.update(kwargs)

        def __call__(self, model, settings, output, progress=None):
            asked["settings"] = settings
            return SimpleNamespace(to_dict=lambda: {"score": 1.0}, to_markdown=lambda: "emoji table")

    monkeypatch.setattr(emoji_eval, "HeldOutEmoji", Suite)
    assert main(["eval", "tiny", "--size", "32", "--output", str(tmp_path), "--quiet", "--suite", "emoji",
                 "--limit", "12"]) == 0
    assert asked["limit"] == 12 and asked["size"] == 32
    assert (asked["settings"].height, asked["settings"].width) == (32, 32)
    assert json.loads((tmp_path / "summary.json").read_text())["emoji"] == {"score": 1.0}


def test_an_imported_module_whose_own_import_fails_raises_that_error(tmp_path, monkeypatch):
    import sys

    from nextstep.cli import import_modules

    (tmp_path / "rare_paths_plugin.py").write_text("import rare_paths_missing_dependency\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(ModuleNotFoundError, match=r"^No module named 'rare_paths_missing_dependency'$"):
        import_modules(["rare_paths_plugin"])


# ------------------------------------------------------------------ emoji, fashion, logs and vocabularies
def test_the_emoji_dataset_names_the_package_it_needs_for_names(monkeypatch):
    import sys

    from nextstep.training.data.emoji import _emoji_names

    monkeypatch.setitem(sys.modules, "emoji", None)
    with pytest.raises(ImportError, match=r"the emoji dataset needs the PyPI package 'emoji' for names; "):
        _emoji_names()


@needs_emoji
def test_an_emoji_dataset_with_its_font_open_pickles_and_draws_the_same_image():
    from nextstep.training.data.emoji import EmojiConfig, EmojiDataset

    dataset = EmojiDataset(EmojiConfig(split="test", size=16))
    image = dataset.load(0).image
    assert dataset._font is not None
    copy = pickle.loads(pickle.dumps(dataset))
    assert copy._font is None and dataset._font is not None  # the copy opens its own
    assert copy.load(0).image.tobytes() == image.tobytes()


def test_emoji_evaluation_arguments_outside_their_domain_are_named():
    from nextstep.evaluation.emoji_eval import SeenEmojiRetrieval, fit_caption_map, run_emoji_eval
    from nextstep.evaluation.sampling import SamplingSettings

    with pytest.raises(ValueError, match=r"^the training emoji must split into a fitting part and a validation part$"):
        fit_caption_map(torch.zeros(3, 2), torch.zeros(3, 2), ["a", "a", "a"])
    with pytest.raises(ValueError, match=r"^emoji are square: expected width == height, found 64x32$"):
        run_emoji_eval(None, settings=SamplingSettings(height=32, width=64))
    retrieval = SeenEmojiRetrieval.__new__(SeenEmojiRetrieval)
    retrieval.size = 32
    with pytest.raises(ValueError, match=r"^expected 32x32 settings, found 64x32$"):
        retrieval(None, SamplingSettings(height=32, width=64))


@needs_emoji
def test_emoji_evaluations_of_too_few_emoji_are_refused_before_any_network_loads():
    from nextstep.evaluation.emoji_eval import SeenEmojiRetrieval, run_emoji_eval
    from nextstep.evaluation.sampling import SamplingSettings

    with pytest.raises(ValueError, match=r"^the emoji evaluation needs at least 10 held-out emoji, found 9$"):
        run_emoji_eval(None, settings=SamplingSettings(height=16, width=16), limit=9)
    with pytest.raises(ValueError, match=r"^count must be in \[10, \d+\), found 9$"):
        SeenEmojiRetrieval(size=16, count=9)


def test_fashion_mnist_files_of_unequal_lengths_are_refused(tmp_path):
    import gzip

    from nextstep.training.data import fashion_mnist

    images_name, labels_name = fashion_mnist._FILES["test"]
    with gzip.open(tmp_path / images_name, "wb") as handle:
        handle.write((0x803).to_bytes(4, "big") + bytes(12) + bytes(2 * 28 * 28))
    with gzip.open(tmp_path / labels_name, "wb") as handle:
        handle.write((0x801).to_bytes(4, "big") + bytes(4) + bytes(3))
    with pytest.raises(ValueError, match=r"^Fashion-MNIST test: 2 images but 3 labels$"):
        fashion_mnist.load_arrays("test", tmp_path)


@needs_fashion_mnist
def test_fashion_mnist_images_have_the_configured_side():
    from nextstep.training.data import fashion_mnist

    dataset = fashion_mnist.FashionMNISTDataset(fashion_mnist.FashionMNISTConfig(split="test", size=20))
    assert dataset.image_size(3) == (20, 20) == dataset.load(3).image.size


def test_an_empty_log_file_keeps_the_columns_it_is_given(tmp_path):
    from nextstep.training.logging import CSVLog

    (tmp_path / "log.csv").write_text("")
    log = CSVLog(tmp_path / "log.csv", columns=("step", "loss"))
    assert log.columns == ["step", "loss"]
    assert (tmp_path / "log.csv").read_text().splitlines()[0] == "step,loss"


def _without_image_start():
    from nextstep.tokenizers import ByteTextTokenizer
    from nextstep.tokenizers.special_tokens import BEGIN_OF_IMAGE

    class WithoutImageStart(ByteTextTokenizer):
        def special_token_id(self, token):
            if token == BEGIN_OF_IMAGE:
                raise ValueError(f"no special token {token!r}")
            return super().special_token_id(token)

    return WithoutImageStart(), ByteTextTokenizer().special_token_id(BEGIN_OF_IMAGE)


def test_a_special_token_one_vocabulary_lacks_gets_no_source_row():
    from nextstep.retokenize import vocabulary_transfer
    from nextstep.tokenizers import ByteTextTokenizer

    lacking, begin = _without_image_start()
    sources = vocabulary_transfer(lacking, ByteTextTokenizer())
    assert sources[begin] == [] and sources[:256] == [[value] for value in range(256)]
    assert sum(1 for ids in sources if not ids) == 1


def test_rows_without_sources_stay_fresh():
    from nextstep.retokenize import _transferred_rows

    old, fresh = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.full((3, 2), 9.0)
    assert torch.equal(_transferred_rows(old, [[0, 1], [], [1]], fresh), torch.tensor([[2.0, 3.0], [9.0, 9.0],
                                                                                         [3.0, 4.0]]))


def test_an_id_the_new_vocabulary_does_not_mark_special_reads_through_its_spelling():
    from nextstep.retokenize import vocabulary_transfer
    from nextstep.tokenizers import ByteTextTokenizer
    from nextstep.tokenizers.special_tokens import BEGIN_OF_IMAGE

    lacking, begin = _without_image_start()
    sources = vocabulary_transfer(ByteTextTokenizer(), lacking)
    assert sources[begin] == list(BEGIN_OF_IMAGE.encode())
    assert all(sources[i] == [i] for i in range(lacking.vocab_size) if i != begin)


def test_recipe_files_and_fields_that_cannot_be_read_are_named(tmp_path):
    from nextstep.training.recipe import load_recipe
    from nextstep.training.tokenizer_recipe import TokenizerRecipeConfig, load_tokenizer_recipe

    (tmp_path / "latin.json").write_bytes('{"model": "tiny", "note": "caf\xe9"}'.encode("latin-1"))
    for load in (load_recipe, load_tokenizer_recipe):
        with pytest.raises(ValueError, match=r"latin.json is not UTF-8 text, as a recipe is"):
            load(str(tmp_path / "latin.json"))
    with pytest.raises(ValueError, match=r"datasets\[1\] \{.*\"type\": \"shapes\"\}: ShapesConfig got unknown key"):
        load_recipe("tiny_emoji_shapes", ['data.datasets=[{"type": "shapes"}, {"type": "shapes", "nope": 1}]'])
    with pytest.raises(ValueError, match="tokenizer must be a tokenizer preset's name or a VAE checkpoint's path"):
        TokenizerRecipeConfig(tokenizer=" ")
