"""Latent caches: refusals that name what differs, damaged or incomplete caches, samples at their source indices."""

import json
import os

import pytest
from safetensors import safe_open
from safetensors.torch import save_file
from training_helpers import folder_of_two_shapes

from nextstep import build_model
from nextstep.training import build_latent_cache
from nextstep.training.data import AspectRatioBuckets, LatentCacheDataset, ShapesConfig, ShapesDataset
from nextstep.training.data.latent_cache import LatentCacheConfig


@pytest.fixture(scope="module")
def model():
    return build_model("tiny", seed=0)


def _recipe(folder, model_seed=0, **data):
    from nextstep.training.recipe import RecipeConfig

    spec = {"type": "shapes", "num_samples": 8, "size": 32, **data.pop("spec", {})}
    return RecipeConfig.from_dict({"model": "tiny", "model_seed": model_seed, "data": {
        "datasets": [spec], "resolution": 32, "latent_cache": str(folder), **data}})


def _drop_recorded(folder, *names):
    index = json.loads((folder / "index.json").read_text())
    for name in names:
        index.pop(name, None)
    (folder / "index.json").write_text(json.dumps(index))


def _strip_source_indices(folder):
    """Make ``folder`` look like a cache written before shards recorded their samples' source indices."""
    _drop_recorded(folder, "sample_order", "built_from")
    for path in sorted(folder.glob("shard-*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            metadata = {k: v for k, v in handle.metadata().items() if k != "source_indices"}
            tokens = handle.get_tensor("tokens")
        save_file({"tokens": tokens}, str(path), metadata=metadata)


def test_a_refused_cache_names_what_differs_with_the_values_there_and_here(tmp_path, model):
    from nextstep.training.recipe import recipe_training_data

    cache = tmp_path / "cache"
    recipe_training_data(_recipe(cache), model)
    cases = [
        (_recipe(cache, resolution=64), r"\(buckets\.resolution: 32 there, 64 here\)"),
        (_recipe(cache, multi_aspect=True), r"\(buckets\.multi_aspect: false there, true here\)"),
        (_recipe(cache, resolution=64, grid_multiple=2),
         r"\(buckets\.grid_multiple: 1 there, 2 here; buckets\.resolution: 32 there, 64 here\)"),
        (_recipe(cache, spec={"seed": 3}),  # other samples, so another digest of them too
         r"\(dataset\.contents: \"[0-9a-f]{16}\" there, \"[0-9a-f]{16}\" here; dataset\.spec\.seed: 0 there, 3 here\)"),
        (_recipe(cache, spec={"num_samples": 12}),
         r"\(dataset\.contents: \"[0-9a-f]{16}\" there, \"[0-9a-f]{16}\" here; dataset\.spec\.num_samples: 8 "
         r"there, 12 here; samples: 8 there, 12 here\)"),
    ]
    for recipe, differing in cases:
        with pytest.raises(ValueError, match=r"another tokenizer encoder or dataset, or for other buckets, than this "
                                             rf"one {differing}; to keep both caches, choose another latent_cache "
                                             r"folder \(data\.latent_cache\) for this one; deleting .*00-shapes "
                                             r"rebuilds it here, and the cache it holds now is lost"):
            recipe_training_data(recipe, model)
    with pytest.raises(ValueError, match=r"\(the image tokenizer's encoder fingerprint: \"[0-9a-f]{32}\" there, "
                                         r"\"[0-9a-f]{32}\" here\)"):
        recipe_training_data(_recipe(cache), build_model("tiny", seed=1))
    index = json.loads((cache / "00-shapes" / "index.json").read_text())
    assert index["built_from"]["buckets"] == {"resolution": 32, "multi_aspect": False, "grid_multiple": 1,
                                              "pixels_per_token": 16}
    assert index["built_from"]["dataset"]["spec"]["num_samples"] == 8


def test_an_index_without_what_it_was_built_from_is_refused_as_precisely_as_it_allows_and_then_records_it(
        tmp_path, model):
    from nextstep.training.recipe import recipe_training_data

    cache = tmp_path / "cache"
    recipe_training_data(_recipe(cache), model)
    _drop_recorded(cache / "00-shapes", "built_from")
    with pytest.raises(ValueError, match=r"\(buckets: images of \(height, width\) \[\(32, 32\)\] in pixels there, not "
                                         r"among the buckets \[\(64, 64\)\] here \(another resolution, multi_aspect or "
                                         r"grid_multiple\); the dataset and the buckets \(resolution, multi_aspect, "
                                         r"grid_multiple\) it was built from are not recorded in its index"):
        recipe_training_data(_recipe(cache, resolution=64), model)
    with pytest.raises(ValueError, match=r"\(samples: 8 there, 12 here; the dataset and the buckets"):
        recipe_training_data(_recipe(cache, spec={"num_samples": 12}), model)
    recipe_training_data(_recipe(cache), model)  # still its own recipe's cache; its index now records it
    assert json.loads((cache / "00-shapes" / "index.json").read_text())["built_from"]["buckets"]["resolution"] == 32


def test_a_shard_that_cannot_be_read_is_named_with_how_to_rebuild_the_cache(tmp_path, model):
    folder = build_latent_cache(model.image_tokenizer, ShapesDataset(ShapesConfig(num_samples=4, size=32)),
                                AspectRatioBuckets(32, multi_aspect=False), tmp_path / "cache")
    os.truncate(folder / "shard-00000.safetensors", 600)
    with pytest.raises(ValueError, match=r"latent cache shard .*shard-00000\.safetensors cannot be read \(.*\): the "
                                         r"cache at .*cache is damaged; delete .*index\.json \(or the whole folder\) "
                                         r"so that the next run with data\.latent_cache \(or build_latent_cache\) "
                                         r"rebuilds it"):
        LatentCacheDataset(LatentCacheConfig(str(folder)))


def test_a_cache_missing_a_shard_is_rebuilt_and_read_as_a_dataset_says_how(tmp_path, model, caplog):
    from nextstep.training.recipe import recipe_training_data

    cache = tmp_path / "cache"
    recipe_training_data(_recipe(cache), model)
    folder = cache / "00-shapes"
    (folder / "shard-00000.safetensors").unlink()
    missing = (r"shard-00000\.safetensors is missing, though .*index\.json lists it: the cache at .*00-shapes is "
               r"incomplete\. Rebuild it: run the recipe that built it again \(data\.latent_cache .*cache, dataset "
               r"\{.*\"num_samples\": 8, .*\"type\": \"shapes\"\}\), which rebuilds a cache missing shards, or call "
               r"nextstep\.training\.build_latent_cache")
    with pytest.raises(FileNotFoundError, match=missing):
        LatentCacheDataset(LatentCacheConfig(str(folder)))
    with caplog.at_level("WARNING", logger="nextstep.training"):
        data = recipe_training_data(_recipe(cache), model)
    assert "lacks 1 shard(s) its index lists (shard-00000.safetensors); it is rebuilt" in caplog.text
    assert len(data.dataset) == 8 and (folder / "shard-00000.safetensors").is_file()
    assert data.dataset.load(0).tokens.shape == (4, 64)


def test_a_cache_serves_each_sample_at_its_source_index_so_the_batches_are_those_of_the_images(tmp_path, model):
    from nextstep.training.data import ImageFolderConfig, ImageFolderDataset
    from nextstep.training.data.loader import BatchLayout, TrainingBatches

    folder_of_two_shapes(tmp_path / "images")
    images = ImageFolderDataset(ImageFolderConfig(path=str(tmp_path / "images")))
    buckets = AspectRatioBuckets(32, multi_aspect=True)
    build_latent_cache(model.image_tokenizer, images, buckets, tmp_path / "cache", shard_size=3)
    cached = LatentCacheDataset(LatentCacheConfig(str(tmp_path / "cache")))
    assert cached.keys == [images.load(index).key for index in range(8)]
    from_images, from_cache = (TrainingBatches(data, buckets, BatchLayout(2), seed=3) for data in (images, cached))
    assert from_cache.sizes == from_images.sizes and len(set(from_images.sizes)) == 2
    assert ([from_cache.plan.global_batch(step) for step in range(8)]
            == [from_images.plan.global_batch(step) for step in range(8)])
    assert cached.source_indices == list(range(8)) and cached.in_source_order

    # A cache written before shards recorded the source indices is read as it was: in shard order.
    _strip_source_indices(tmp_path / "cache")
    older = LatentCacheDataset(LatentCacheConfig(str(tmp_path / "cache")))
    assert older.source_indices is None and not older.in_source_order
    assert [key[-8:] for key in older.keys] == [f"img{index}.png" for index in (1, 3, 5, 7, 0, 2, 4, 6)]


def test_a_sample_the_build_could_not_read_stays_at_its_source_index_and_fails_as_its_image_did(tmp_path, model):
    from nextstep.training.data import CorruptSampleError, ImageFolderConfig, ImageFolderDataset
    from nextstep.training.data.loader import BatchAssembler, BatchLayout, TrainingBatches

    folder_of_two_shapes(tmp_path / "images")
    data = (tmp_path / "images" / "img2.png").read_bytes()
    (tmp_path / "images" / "img2.png").write_bytes(data[: len(data) // 2])  # the header reads, the pixels do not
    images = ImageFolderDataset(ImageFolderConfig(path=str(tmp_path / "images")))
    buckets = AspectRatioBuckets(32, multi_aspect=True)
    build_latent_cache(model.image_tokenizer, images, buckets, tmp_path / "cache", max_bad_fraction=0.2,
                       shard_size=2)
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert index["num_samples"] == 7 and [entry["source_index"] for entry in index["dropped_samples"]] == [2]
    cached = LatentCacheDataset(LatentCacheConfig(str(tmp_path / "cache")))
    assert len(cached) == 8 and cached.source_indices == list(range(8)) and cached.in_source_order
    assert cached.keys == [str(path) for path in images.paths] and cached.caption(2) == "picture 2"
    assert cached.image_size(2) == (32, 32) and cached.locations[2] is None
    failures = []
    for dataset in (images, cached):
        with pytest.raises(CorruptSampleError) as caught:
            dataset.load(2)
        failures.append((caught.value.key, caught.value.reason))
    assert failures[0] == failures[1] and f"{failures[0][0]} ({failures[0][1]})" in cached.known_bad

    # The loader replaces it as it does the image: the same samples in the same batches, the same bad keys.
    from_images, from_cache = (TrainingBatches(data, buckets, BatchLayout(2), seed=5) for data in (images, cached))
    assert from_cache.sizes == from_images.sizes
    read = {name: [] for name in ("images", "cache")}
    for name, batches, dataset in (("images", from_images, images), ("cache", from_cache, cached)):
        assembler = BatchAssembler(dataset, batches.sizes)
        for step in range(8):
            indices = batches.plan.global_batch(step)
            batch = assembler[(indices, batches.sizes[indices[0]])]
            read[name].append((batch.keys, batch.bad_keys, batch.attempted))
    assert read["cache"] == read["images"]
    assert any(bad for _, bad, _ in read["images"])


def test_a_cache_from_before_dropped_samples_were_recorded_serves_the_others_outside_source_order(tmp_path, model):
    from nextstep.training.data import ImageFolderConfig, ImageFolderDataset

    folder_of_two_shapes(tmp_path / "images")
    data = (tmp_path / "images" / "img2.png").read_bytes()
    (tmp_path / "images" / "img2.png").write_bytes(data[: len(data) // 2])
    images = ImageFolderDataset(ImageFolderConfig(path=str(tmp_path / "images")))
    build_latent_cache(model.image_tokenizer, images, AspectRatioBuckets(32, multi_aspect=True), tmp_path / "cache",
                       max_bad_fraction=0.2)
    _drop_recorded(tmp_path / "cache", "dropped_samples")
    cached = LatentCacheDataset(LatentCacheConfig(str(tmp_path / "cache")))
    assert cached.source_indices == [0, 1, 3, 4, 5, 6, 7] and not cached.in_source_order
    assert len(cached) == 7 and None not in cached.locations


def test_a_dropped_sample_whose_caption_the_dataset_cannot_give_raises_for_its_caption_too(tmp_path, model):
    from nextstep.training.data import CorruptSampleError, ImageTextSample

    build_latent_cache(model.image_tokenizer, _half_broken(), AspectRatioBuckets(32, multi_aspect=False),
                       tmp_path / "cache", max_bad_fraction=0.5)
    cached = LatentCacheDataset(LatentCacheConfig(str(tmp_path / "cache")))
    assert len(cached) == 4 and cached.in_source_order and isinstance(cached.load(0), ImageTextSample)
    assert "caption" not in json.loads((tmp_path / "cache" / "index.json").read_text())["dropped_samples"][0]
    with pytest.raises(CorruptSampleError, match="sample-1: broken on purpose"):
        cached.caption(1)


def test_a_cache_refused_for_another_data_description_alone_says_so(tmp_path, model):
    dataset = ShapesDataset(ShapesConfig(num_samples=4, size=32))
    buckets = AspectRatioBuckets(32, multi_aspect=False)
    build_latent_cache(model.image_tokenizer, dataset, buckets, tmp_path / "cache", source="first")
    with pytest.raises(ValueError, match=r"than this one \(the description of its data \(fingerprint\): \"\w+\" "
                                         r"there, \"\w+\" here\)"):
        build_latent_cache(model.image_tokenizer, dataset, buckets, tmp_path / "cache", source="second")


def test_a_dropped_wide_sample_keeps_the_grid_of_its_bucket_so_the_batches_are_those_of_the_images(tmp_path, model):
    from nextstep.training.data import ImageFolderConfig, ImageFolderDataset
    from nextstep.training.data.loader import BatchLayout, TrainingBatches

    folder_of_two_shapes(tmp_path / "images")
    data = (tmp_path / "images" / "img1.png").read_bytes()
    (tmp_path / "images" / "img1.png").write_bytes(data[: len(data) // 2])  # a wide image whose pixels do not read
    images = ImageFolderDataset(ImageFolderConfig(path=str(tmp_path / "images")))
    buckets = AspectRatioBuckets(32, multi_aspect=True)
    build_latent_cache(model.image_tokenizer, images, buckets, tmp_path / "cache", max_bad_fraction=0.2)
    cached = LatentCacheDataset(LatentCacheConfig(str(tmp_path / "cache")))
    assert cached.locations[1] is None and cached.grids[1] == cached.grids[3] != cached.grids[0]
    assert cached.image_size(1) == cached.image_size(3)
    from_images, from_cache = (TrainingBatches(data, buckets, BatchLayout(2), seed=5) for data in (images, cached))
    assert from_cache.sizes == from_images.sizes


def test_a_refused_cache_holding_a_dropped_sample_does_not_name_its_sample_count_as_a_difference(tmp_path, model):
    buckets = AspectRatioBuckets(32, multi_aspect=False)
    build_latent_cache(model.image_tokenizer, _half_broken(), buckets, tmp_path / "cache", source="first",
                       max_bad_fraction=0.5)
    with pytest.raises(ValueError, match=r"than this one \(the description of its data \(fingerprint\): \"\w+\" "
                                         r"there, \"\w+\" here\)") as refused:
        build_latent_cache(model.image_tokenizer, _half_broken(), buckets, tmp_path / "cache", source="second",
                           max_bad_fraction=0.5)
    assert "samples:" not in str(refused.value)


def test_a_refused_cache_from_before_the_encoder_was_recorded_alone_does_not_blame_the_encoder(tmp_path, model):
    dataset = ShapesDataset(ShapesConfig(num_samples=4, size=32))
    buckets = AspectRatioBuckets(32, multi_aspect=False)
    build_latent_cache(model.image_tokenizer, dataset, buckets, tmp_path / "cache", source="first")
    _drop_recorded(tmp_path / "cache", "tokenizer_fingerprint")
    with pytest.raises(ValueError, match=r"than this one \(the description of its data \(fingerprint\): \"\w+\" "
                                         r"there, \"\w+\" here\)") as refused:
        build_latent_cache(model.image_tokenizer, dataset, buckets, tmp_path / "cache", source="second")
    assert "encoder fingerprint" not in str(refused.value)


def _half_broken():
    """Four shapes images of 32 x 32, of which sample 1 cannot be read."""
    from nextstep.training.data import CorruptSampleError, ImageTextDataset

    class HalfBroken(ImageTextDataset):
        def __len__(self):
            return 4

        def image_size(self, index):
            return (32, 32)

        def load(self, index):
            if index == 1:
                raise CorruptSampleError(f"sample-{index}", "broken on purpose")
            return ShapesDataset(ShapesConfig(num_samples=4, size=32)).load(index)

    return HalfBroken()
