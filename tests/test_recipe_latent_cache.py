"""Recipes with latent caches: caches given as datasets, and resumed runs whose caches changed or were switched."""

import csv
import json

import pytest
from safetensors import safe_open
from safetensors.torch import save_file
from training_helpers import folder_of_two_shapes

from nextstep import build_model
from nextstep.training.recipe import RecipeConfig, run_recipe


def _recipe(datasets, cache="", steps=2, resolution=32, **data):
    return RecipeConfig.from_dict({
        "model": "tiny",
        "data": {"datasets": datasets, "resolution": resolution, "latent_cache": str(cache), **data},
        "train": {"max_steps": steps, "micro_batch_size": 2, "learning_rate": 1e-3, "warmup_steps": 1,
                  "log_every": 1, "sample_every": 0, "checkpoint_every": 1, "num_workers": 0, "ema_decay": 0}})


SHAPES = [{"type": "shapes", "num_samples": 8, "size": 32}]


def _losses(run):
    with open(run / "train_log.csv") as log:
        return [float(row["loss"]) for row in csv.DictReader(log)]


def test_a_latent_cache_dataset_is_read_as_it_is_when_data_latent_cache_is_set(tmp_path):
    from nextstep.training.data import LatentCacheDataset
    from nextstep.training.recipe import recipe_training_data

    model = build_model("tiny", seed=0)
    recipe_training_data(_recipe(SHAPES, tmp_path / "first"), model)
    cached = {"type": "latent_cache", "path": str(tmp_path / "first" / "00-shapes")}
    data = recipe_training_data(_recipe([cached], tmp_path / "second"), model)
    assert isinstance(data.dataset, LatentCacheDataset) and data.dataset.directory == tmp_path / "first" / "00-shapes"
    assert not (tmp_path / "second").exists()  # nothing to encode: no folder made
    data = recipe_training_data(_recipe([cached, *SHAPES], tmp_path / "second"), model)
    assert len(data.dataset) == 16 and sorted(p.name for p in (tmp_path / "second").iterdir()) == ["01-shapes"]


def test_a_latent_cache_dataset_of_other_buckets_is_refused_before_the_run_folder_is_written(tmp_path):
    run_recipe(_recipe(SHAPES, tmp_path / "cache"), tmp_path / "first", show_progress=False)
    cached = [{"type": "latent_cache", "path": str(tmp_path / "cache" / "00-shapes")}]
    with pytest.raises(ValueError, match=r"holds images of \(height, width\) \[\(32, 32\)\] in pixels, which are not "
                                         r"among this run's buckets \[\(64, 64\)\]"):
        run_recipe(_recipe(cached, resolution=64), tmp_path / "run", show_progress=False)
    assert not (tmp_path / "run" / "recipe.json").exists()


def test_a_run_resumed_with_its_cache_switched_on_trains_on_the_same_batches(tmp_path):
    folder_of_two_shapes(tmp_path / "images")
    images = [{"type": "folder", "path": str(tmp_path / "images")}]
    runs = {}
    for name, cache in (("images", ""), ("cache", tmp_path / "cache")):
        run_recipe(_recipe(images, steps=2, multi_aspect=True), tmp_path / name, show_progress=False)
        run_recipe(_recipe(images, cache, steps=4, multi_aspect=True), tmp_path / name, show_progress=False)
        runs[name] = _losses(tmp_path / name)
    assert runs["cache"] == pytest.approx(runs["images"], abs=1e-4)
    record = json.loads((tmp_path / "cache" / "latent_caches.json").read_text())
    assert record["datasets"] == [{"type": "folder", "read_from": str(tmp_path / "cache" / "00-folder"),
                                   "source_order": True}]


def _as_written_before_source_indices(folder):
    index = json.loads((folder / "index.json").read_text())
    index.pop("sample_order", None)
    (folder / "index.json").write_text(json.dumps(index))
    for path in sorted(folder.glob("shard-*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            metadata = {k: v for k, v in handle.metadata().items() if k != "source_indices"}
            tokens = handle.get_tensor("tokens")
        save_file({"tokens": tokens}, str(path), metadata=metadata)


def test_a_resume_that_switches_to_or_from_a_cache_in_another_order_is_refused(tmp_path):
    folder_of_two_shapes(tmp_path / "images")
    images = [{"type": "folder", "path": str(tmp_path / "images")}]
    cache = tmp_path / "cache"
    run_recipe(_recipe(images, cache, steps=1, multi_aspect=True), tmp_path / "built", show_progress=False)
    _as_written_before_source_indices(cache / "00-folder")
    run_recipe(_recipe(images, steps=2, multi_aspect=True), tmp_path / "run", show_progress=False)
    refusal = (r"cannot continue with this data: dataset 0 \(folder\) was read from its images there and from the "
               r"latent cache .*00-folder \(in another order than the dataset's: built before caches recorded their "
               r"samples' source indices, or the samples they could not read\) here, so the resumed steps would "
               r"train on other batches; resume with data.latent_cache=\"\" as the run had it, or pass --no-resume")
    with pytest.raises(ValueError, match=refusal):
        run_recipe(_recipe(images, cache, steps=4, multi_aspect=True), tmp_path / "run", show_progress=False)
    assert len(_losses(tmp_path / "run")) == 2  # the refused rerun left the run as it was
    run_recipe(_recipe(images, cache, steps=2, multi_aspect=True), tmp_path / "on", show_progress=False)
    with pytest.raises(ValueError, match=r"was read from the latent cache .*00-folder \(in another order .*\) there "
                                         rf"and from its images here, .*resume with data.latent_cache=\"{cache}\""):
        run_recipe(_recipe(images, steps=4, multi_aspect=True), tmp_path / "on", show_progress=False)
    run_recipe(_recipe(images, cache, steps=3, multi_aspect=True), tmp_path / "on", show_progress=False)  # its own


def test_a_resume_over_a_latent_cache_dataset_rebuilt_from_other_data_is_refused(tmp_path):
    build = tmp_path / "build"
    run_recipe(_recipe(SHAPES, build, steps=1), tmp_path / "built", show_progress=False)
    cached = [{"type": "latent_cache", "path": str(build / "00-shapes")}]
    run_recipe(_recipe(cached, steps=2), tmp_path / "run", show_progress=False)
    for path in build.glob("00-shapes/*"):
        path.unlink()
    other = [{"type": "shapes", "num_samples": 12, "size": 32, "seed": 5}]
    run_recipe(_recipe(other, build, steps=1), tmp_path / "rebuilt", show_progress=False)
    with pytest.raises(ValueError, match=r"dataset 0: the latent cache at .*00-shapes changed since the run began "
                                         r"\(fingerprint [0-9a-f]{32} there, [0-9a-f]{32} here, num_samples 8 there, "
                                         r"12 here\), so it holds other samples; pass --no-resume"):
        run_recipe(_recipe(cached, steps=4), tmp_path / "run", show_progress=False)
    assert len(_losses(tmp_path / "run")) == 2
    (tmp_path / "run" / "latent_caches.json").unlink()  # a run from before the record resumes as before
    run_recipe(_recipe(cached, steps=3), tmp_path / "run", show_progress=False)
    assert len(_losses(tmp_path / "run")) == 3
    run_recipe(_recipe(cached, steps=1), tmp_path / "run", resume=False, show_progress=False)
    assert (tmp_path / "run" / "earlier-runs" / "1" / "latent_caches.json").is_file()


def test_a_run_over_an_unreadable_image_resumed_with_its_cache_switched_on_trains_on_the_same_batches(tmp_path):
    folder_of_two_shapes(tmp_path / "images")
    data = (tmp_path / "images" / "img2.png").read_bytes()
    (tmp_path / "images" / "img2.png").write_bytes(data[: len(data) // 2])  # the header reads, the pixels do not
    images = [{"type": "folder", "path": str(tmp_path / "images")}]

    def recipe(cache="", steps=2):
        built = _recipe(images, cache, steps=steps, multi_aspect=True)
        built.train.max_bad_fraction = 0.2
        return built

    runs = {}
    for name, cache in (("images", ""), ("cache", tmp_path / "cache")):
        run_recipe(recipe(steps=2), tmp_path / name, show_progress=False)
        run_recipe(recipe(cache, steps=4), tmp_path / name, show_progress=False)
        runs[name] = _losses(tmp_path / name)
    assert runs["cache"] == pytest.approx(runs["images"], abs=1e-4)
    record = json.loads((tmp_path / "cache" / "latent_caches.json").read_text())
    assert record["datasets"][0]["source_order"] is True
    index = json.loads((tmp_path / "cache" / "00-folder" / "index.json").read_text())
    assert [entry["source_index"] for entry in index["dropped_samples"]] == [2]


def test_a_resume_over_a_latent_cache_dataset_rebuilt_with_a_sample_it_could_not_read_is_refused(tmp_path):
    from nextstep.training import build_latent_cache
    from nextstep.training.data import AspectRatioBuckets, ImageFolderConfig, ImageFolderDataset
    from nextstep.training.recipe import check_latent_caches, record_latent_caches

    tokenizer = build_model("tiny", seed=0).image_tokenizer
    folder_of_two_shapes(tmp_path / "images")
    buckets = AspectRatioBuckets(32, multi_aspect=True)

    def build_cache():
        images = ImageFolderDataset(ImageFolderConfig(path=str(tmp_path / "images")))
        build_latent_cache(tokenizer, images, buckets, tmp_path / "cache", max_bad_fraction=0.2)

    build_cache()
    recipe = _recipe([{"type": "latent_cache", "path": str(tmp_path / "cache")}], multi_aspect=True)
    (tmp_path / "run").mkdir()
    record_latent_caches(recipe, tmp_path / "run")
    check_latent_caches(recipe, tmp_path / "run", True)  # the same cache resumes
    for path in (tmp_path / "cache").iterdir():
        path.unlink()
    data = (tmp_path / "images" / "img2.png").read_bytes()
    (tmp_path / "images" / "img2.png").write_bytes(data[: len(data) // 2])  # the header reads, the pixels do not
    build_cache()
    with pytest.raises(ValueError, match=r"dataset 0: the latent cache at .*cache changed since the run began "
                                         r"\(num_samples 8 there, 7 here\), so it holds other samples"):
        check_latent_caches(recipe, tmp_path / "run", True)


def test_a_run_resumed_from_its_images_after_its_cache_records_that_it_reads_the_images_now(tmp_path):
    from nextstep.training.recipe import check_latent_caches, recipe_training_data, record_latent_caches

    with_cache, from_images = _recipe(SHAPES, tmp_path / "cache"), _recipe(SHAPES)
    recipe_training_data(with_cache, build_model("tiny", seed=0))
    run = tmp_path / "run"
    run.mkdir()
    record_latent_caches(with_cache, run)
    check_latent_caches(from_images, run, True)  # the cache serves the images' order: the switch is allowed
    record_latent_caches(from_images, run)
    record = json.loads((run / "latent_caches.json").read_text())
    assert record == {"latent_cache": "", "datasets": [{"type": "shapes", "read_from": None, "source_order": True}]}
    index_path = tmp_path / "cache" / "00-shapes" / "index.json"
    index = json.loads(index_path.read_text())
    index.pop("sample_order")  # as written before caches recorded their samples' source indices
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"dataset 0 \(shapes\) was read from its images there and from the latent "
                                         r"cache .*00-shapes \(in another order"):
        check_latent_caches(with_cache, run, True)


def test_a_resume_over_a_latent_cache_dataset_whose_index_alone_was_rewritten_goes_on(tmp_path):
    build = tmp_path / "build"
    run_recipe(_recipe(SHAPES, build, steps=1), tmp_path / "built", show_progress=False)
    cached = [{"type": "latent_cache", "path": str(build / "00-shapes")}]
    run_recipe(_recipe(cached, steps=2), tmp_path / "run", show_progress=False)
    record = json.loads((tmp_path / "run" / "latent_caches.json").read_text())
    assert [name for name, _, _ in record["datasets"][0]["shard_files"]] == ["shard-00000.safetensors"]
    index_path = build / "00-shapes" / "index.json"
    index = json.loads(index_path.read_text())
    index["fingerprint"] = "0" * 32  # as a format upgrade, or another description of the same data, rewrites it
    index_path.write_text(json.dumps(index))
    run_recipe(_recipe(cached, steps=3), tmp_path / "run", show_progress=False)
    assert len(_losses(tmp_path / "run")) == 3
