"""Latent caches: tokens equal the tokenizer's, training from them equals training from images."""

import json

import pytest
import torch
from training_helpers import tiny_config

from nextstep import build_model
from nextstep.training import TextToImageTask, Trainer, TrainingData, build_latent_cache
from nextstep.training.data import AspectRatioBuckets, LatentCacheDataset, ShapesConfig, ShapesDataset
from nextstep.training.data.latent_cache import LatentCacheConfig


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    model = build_model("tiny", seed=0)
    dataset = ShapesDataset(ShapesConfig(num_samples=24, size=32))
    folder = tmp_path_factory.mktemp("cache")
    build_latent_cache(model.image_tokenizer, dataset, AspectRatioBuckets(32, multi_aspect=False), folder,
                       batch_size=8, shard_size=10)
    return model, dataset, folder


def test_cached_tokens_equal_the_encoded_images(cache):
    model, dataset, folder = cache
    cached = LatentCacheDataset(LatentCacheConfig(str(folder)))
    assert len(cached) == 24 and len(json.loads((folder / "index.json").read_text())["shards"]) == 3
    from nextstep.images import from_pil

    for index in (0, 13, 23):
        sample = cached.load(index)
        number = int(sample.key.rsplit("/", 1)[1])
        tokens, _, _ = model.encode_images(from_pil([dataset.load(number).image]))
        assert sample.grid == (2, 2) and sample.caption == dataset.load(number).caption
        # Batched and single-image convolutions round differently.
        torch.testing.assert_close(sample.tokens, tokens[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_on_the_cache_matches_training_on_images(cache, tmp_path, precision):
    """Under bf16 autocast too: images are encoded in the tokenizer's own precision, as the cache was."""
    _, dataset, folder = cache
    buckets = AspectRatioBuckets(32, multi_aspect=False)
    cached = LatentCacheDataset(LatentCacheConfig(str(folder)))
    order = [int(cached.load(i).key.rsplit("/", 1)[1]) for i in range(len(cached))]

    class Reordered(ShapesDataset):
        # The cache groups samples by bucket; give the image run the same index order.
        def load(self, index):
            return super().load(order[index])

    images = Reordered(dataset.config)
    config = tiny_config(max_steps=3, micro_batch_size=4, precision=precision)
    runs = []
    for name, data in (("images", images), ("cache", cached)):
        trainer = Trainer(TextToImageTask(build_model("tiny", seed=0)), TrainingData(data, buckets), config,
                          tmp_path / name, show_progress=False)
        runs.append([r.loss for r in trainer.fit(resume=False)])
    assert runs[0] == pytest.approx(runs[1], abs=1e-4)


def test_a_cache_read_with_buckets_it_was_not_built_for_is_refused_before_training(cache):
    from nextstep.training.data import ConcatImageTextDataset
    from nextstep.training.data.loader import BatchLayout, TrainingBatches

    _, _, folder = cache
    cached = LatentCacheDataset(LatentCacheConfig(str(folder)))  # 32x32 images, tokens of a 2x2 grid
    for buckets in (AspectRatioBuckets(64, multi_aspect=False), AspectRatioBuckets(32, multi_aspect=True)):
        assert TrainingBatches(ConcatImageTextDataset([cached]), AspectRatioBuckets(32, multi_aspect=False),
                               BatchLayout(4))
        if (32, 32) in buckets.sizes:
            TrainingBatches(cached, buckets, BatchLayout(4))  # every cached size is a bucket: fine
            continue
        with pytest.raises(ValueError, match=r"holds images of \(height, width\) \[\(32, 32\)\] in pixels, "
                                             r"which are not among this run's buckets \[\(64, 64\)\]"):
            TrainingBatches(ConcatImageTextDataset([cached]), buckets, BatchLayout(4))


def test_a_cache_from_another_tokenizer_is_refused(cache):
    _, dataset, folder = cache
    other = build_model("tiny", seed=1)
    with pytest.raises(ValueError, match="another tokenizer encoder or dataset"):
        build_latent_cache(other.image_tokenizer, dataset, AspectRatioBuckets(32, multi_aspect=False), folder)


def test_missing_cache_says_how_to_build_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="build_latent_cache"):
        LatentCacheDataset(LatentCacheConfig(str(tmp_path)))


def small_vae():
    from nextstep.tokenizers import FluxVAE, FluxVAEConfig

    torch.manual_seed(0)
    return FluxVAE(FluxVAEConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4, z_channels=4)).eval()


def build(tokenizer, folder, **kwargs):
    dataset = ShapesDataset(ShapesConfig(num_samples=6, size=16))
    buckets = AspectRatioBuckets(16, tokenizer.pixels_per_token, multi_aspect=False)
    return build_latent_cache(tokenizer, dataset, buckets, folder, **{"batch_size": 6, **kwargs})


def test_a_new_or_wider_decoder_keeps_the_cache_and_a_new_encoder_does_not(tmp_path):
    import copy

    from nextstep.tokenizers.decoder_widening import widen_decoder

    vae = small_vae()
    build(vae, tmp_path / "cache", source="shapes")
    written = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()}
    new_decoder = copy.deepcopy(vae)
    with torch.no_grad():
        for parameter in new_decoder.decoder.parameters():
            parameter.add_(0.1)
    for tokenizer in (new_decoder, widen_decoder(vae, 16)):
        build(tokenizer, tmp_path / "cache", source="shapes")  # accepted as is, nothing rewritten
        assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()} == written
    new_encoder = copy.deepcopy(vae)
    with torch.no_grad():
        next(new_encoder.encoder.parameters()).add_(0.1)
    with pytest.raises(ValueError, match="another tokenizer encoder or dataset"):
        build(new_encoder, tmp_path / "cache", source="shapes")
    with pytest.raises(ValueError, match="another tokenizer encoder or dataset"):
        build(vae, tmp_path / "cache", source="other shapes")


def test_an_index_of_format_1_is_kept_for_its_own_tokenizer_and_upgraded(tmp_path):
    import copy

    from nextstep.training.data.latent_cache import _whole_module_fingerprint, _with_source, tokenizer_fingerprint

    vae = small_vae()
    folder = build(vae, tmp_path / "cache", source="shapes")
    index_path = folder / "index.json"
    index = json.loads(index_path.read_text())
    legacy = {**index, "format_version": 1, "fingerprint": _with_source(_whole_module_fingerprint(vae), "shapes")}
    index_path.write_text(json.dumps(legacy))
    new_decoder = copy.deepcopy(vae)
    with torch.no_grad():
        next(new_decoder.decoder.parameters()).add_(0.1)
    with pytest.raises(ValueError, match="another tokenizer encoder"):  # format 1 cannot tell the decoder apart
        build(new_decoder, folder, source="shapes")
    build(vae, folder, source="shapes")
    upgraded = json.loads(index_path.read_text())
    assert upgraded == {**index, "format_version": 2}
    assert upgraded["fingerprint"] == _with_source(tokenizer_fingerprint(vae), "shapes")
    build(new_decoder, folder, source="shapes")  # from now on a new decoder keeps the cache


def test_every_process_learns_that_the_main_one_refused_a_cache(tmp_path):
    """A process other than the main one hears of a refused cache and stops too, instead of waiting for
    a main process that stopped."""
    from nextstep.training.distributed import DistributedContext
    from nextstep.training.recipe import RecipeConfig, recipe_training_data

    recipe = RecipeConfig.from_dict({"model": "tiny", "data": {
        "datasets": [{"type": "shapes", "num_samples": 8, "size": 32}], "resolution": 32,
        "latent_cache": str(tmp_path / "cache")}})

    class OtherRank(DistributedContext):
        is_main = False

        def broadcast_object(self, value):  # what the main process found
            return "the latent cache at ... was built from another tokenizer encoder or dataset"

    with pytest.raises(ValueError, match="another tokenizer encoder or dataset"):
        recipe_training_data(recipe, build_model("tiny", seed=0), OtherRank())
    assert not (tmp_path / "cache").exists()  # it neither built nor waited for one


def test_a_cache_folder_that_is_not_shared_between_processes_is_named(tmp_path):
    """Processes that cannot see the folder the main process fills would wait for its files forever."""
    from nextstep.training.distributed import DistributedContext

    class Job(DistributedContext):
        def broadcast_object(self, value):
            return value if self.is_main else (".shared-check-written-elsewhere", None)

        def gather_objects(self, value):  # what every process saw, in rank order
            return [True, value] if self.rank == 1 else [value, True]

    main = Job(rank=0, world_size=2)
    main.check_shared_folder(tmp_path / "cache", "data.latent_cache", wait_seconds=0.1)
    assert (tmp_path / "cache").is_dir() and not list((tmp_path / "cache").iterdir())  # its marker is gone
    with pytest.raises(ValueError, match=r"data.latent_cache '.*other' is not one folder for every process: "
                                         r"process\(es\) \[1\] cannot see a file the main process wrote there"):
        Job(rank=1, world_size=2).check_shared_folder(tmp_path / "other", "data.latent_cache", wait_seconds=0.1)
    # A folder the main process cannot make: every process hears of it (none waits in a collective).
    (tmp_path / "afile").write_text("")
    with pytest.raises(ValueError, match=r"data.latent_cache '.*afile/cache' cannot be written by the main process"):
        main.check_shared_folder(tmp_path / "afile" / "cache", "data.latent_cache", wait_seconds=0.1)

    class Told(Job):
        def broadcast_object(self, value):
            return None, "data.latent_cache 'x' cannot be written by the main process: [Errno 20]"

    with pytest.raises(ValueError, match="cannot be written by the main process"):
        Told(rank=1, world_size=2).check_shared_folder(tmp_path / "x", "data.latent_cache", wait_seconds=0.1)


def test_samples_the_build_could_not_read_count_against_training_too(tmp_path):
    from PIL import Image

    from nextstep.training.data import ImageFolderConfig, ImageFolderDataset

    for index in range(20):
        Image.new("RGB", (32, 32), (index * 10, 0, 0)).save(tmp_path / f"{index:02d}.png")
        (tmp_path / f"{index:02d}.txt").write_text(f"picture {index}")
    data = (tmp_path / "05.png").read_bytes()
    (tmp_path / "05.png").write_bytes(data[: len(data) // 2])  # the header reads, the pixels do not
    dataset = ImageFolderDataset(ImageFolderConfig(path=str(tmp_path)))
    model = build_model("tiny", seed=0)
    build_latent_cache(model.image_tokenizer, dataset, AspectRatioBuckets(32, multi_aspect=False),
                       tmp_path / "cache", max_bad_fraction=0.1)
    cached = LatentCacheDataset(LatentCacheConfig(str(tmp_path / "cache")))
    assert len(cached) == 20 and cached.scanned == 20 and cached.in_source_order
    assert len(cached.known_bad) == 1 and "05.png" in cached.known_bad[0]
    assert TrainingData(cached, AspectRatioBuckets(32, multi_aspect=False)).known_bad == cached.known_bad


def test_a_cache_of_a_sampling_tokenizer_warns_that_it_keeps_one_sample(tmp_path, caplog):
    from nextstep.tokenizers import FluxVAE, FluxVAEConfig

    sampling = FluxVAE(FluxVAEConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4, z_channels=4,
                                     deterministic=False)).eval()
    with caplog.at_level("WARNING", logger="nextstep.training"):
        build(sampling, tmp_path / "cache")
    assert "keeps one sample per image" in caplog.text


def test_a_build_with_buckets_of_another_pixels_per_token_or_a_grid_the_tokens_do_not_fill_is_refused(tmp_path):
    vae = small_vae()  # one token per 4 pixels
    dataset = ShapesDataset(ShapesConfig(num_samples=2, size=16))
    with pytest.raises(ValueError, match="the image tokenizer makes one token per 4 pixels; expected buckets with "
                                         "pixels_per_token=4, found 16"):
        build_latent_cache(vae, dataset, AspectRatioBuckets(16, multi_aspect=False), tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
    build(vae, tmp_path / "cache")
    sample = LatentCacheDataset(LatentCacheConfig(str(tmp_path / "cache"))).load(0)
    assert sample.grid == (4, 4) and sample.tokens.shape == (16, vae.token_dim)

    class Claims8(type(vae)):  # its tokens cover 4 pixels, whatever it says
        pixels_per_token = 8

    claims = Claims8(vae.config).eval()
    with pytest.raises(ValueError, match=r"16x16 images at 8 pixels per token make a 2x2 grid: expected 4 tokens per "
                                         r"image, found 16 from the image tokenizer"):
        build_latent_cache(claims, dataset, AspectRatioBuckets(16, 8, multi_aspect=False), tmp_path / "other")


@pytest.mark.parametrize("name", ["batch_size", "shard_size"])
def test_batch_and_shard_sizes_below_1_are_refused(tmp_path, name):
    with pytest.raises(ValueError, match=f"{name} must be an integer >= 1, found 0"):
        build(small_vae(), tmp_path / "cache", **{name: 0})
    assert not (tmp_path / "cache").exists()


def test_a_corrupt_index_is_named(tmp_path):
    folder = build(small_vae(), tmp_path / "cache")
    (folder / "index.json").write_text('{"format_version": 2, ')
    with pytest.raises(ValueError, match=r"index.json is not valid JSON.*delete the folder"):
        LatentCacheDataset(LatentCacheConfig(str(folder)))
    with pytest.raises(ValueError, match=r"index.json is not valid JSON"):
        build(small_vae(), folder)


def _cache_recipe(folder, **fields):
    from nextstep.training.recipe import RecipeConfig

    return RecipeConfig.from_dict({"model": "tiny", **fields, "data": {
        "datasets": [{"type": "latent_cache", "path": str(folder)}], "resolution": 32}})


def test_a_latent_cache_dataset_of_another_image_tokenizer_is_refused_naming_both(cache, tmp_path):
    from nextstep.training.data import BatchLayout
    from nextstep.training.recipe import build_recipe_model, recipe_training_data

    _, _, folder = cache  # built by the tiny model of seed 0
    data = recipe_training_data(_cache_recipe(folder), build_model("tiny", seed=0))
    assert next(iter(data.open(BatchLayout(4)))).tokens.shape == (4, 4, 64)
    other = _cache_recipe(folder, model_seed=1)
    with pytest.raises(ValueError, match=r"holds tokens of another image tokenizer than the model's \(encoder "
                                         r"fingerprint: expected [0-9a-f]{32}, found [0-9a-f]{32}\)"):
        recipe_training_data(other, build_recipe_model(other))
    small = build(small_vae(), tmp_path / "small")  # 16-d tokens of 4 pixels each
    with pytest.raises(ValueError, match=r"\(token width: expected 64, found 16; pixels per token: expected 16, "
                                         r"found 4\)"):
        recipe_training_data(_cache_recipe(small), build_model("tiny", seed=0))


def test_a_latent_cache_written_before_the_encoder_was_recorded_is_checked_for_what_it_holds(tmp_path, caplog):
    from nextstep.training.recipe import recipe_training_data

    model = build_model("tiny", seed=0)
    dataset = ShapesDataset(ShapesConfig(num_samples=4, size=32))
    for name, source in (("plain", ""), ("described", "shapes")):
        folder = tmp_path / name
        build_latent_cache(model.image_tokenizer, dataset, AspectRatioBuckets(32, multi_aspect=False), folder,
                           source=source)
        index = json.loads((folder / "index.json").read_text())
        del index["tokenizer_fingerprint"]
        (folder / "index.json").write_text(json.dumps(index))
    caplog.clear()
    with caplog.at_level("WARNING", logger="nextstep.training"):
        recipe_training_data(_cache_recipe(tmp_path / "plain"), model)  # its fingerprint is the encoder's alone
        assert not caplog.text
        recipe_training_data(_cache_recipe(tmp_path / "described"), model)
        assert "could not be checked against the model's image tokenizer for its encoder" in caplog.text
        recipe_training_data(_cache_recipe(tmp_path / "described"), build_model("tiny", seed=1))  # cannot tell
    index = json.loads((tmp_path / "described" / "index.json").read_text())
    index["token_dim"] = 16
    (tmp_path / "described" / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"token width: expected 64, found 16"):
        recipe_training_data(_cache_recipe(tmp_path / "described"), model)
    # Rebuilding through build_latent_cache records the encoder again.
    build_latent_cache(model.image_tokenizer, dataset, AspectRatioBuckets(32, multi_aspect=False), tmp_path / "plain")
    assert "tokenizer_fingerprint" in json.loads((tmp_path / "plain" / "index.json").read_text())


def test_a_recipe_cache_is_found_by_the_spec_as_read_and_as_spelt_before(tmp_path):
    from nextstep.training.recipe import RecipeConfig, recipe_training_data

    model = build_model("tiny", seed=0)

    def recipe(**spec):
        return RecipeConfig.from_dict({"model": "tiny", "data": {"datasets": [
            {"type": "shapes", "num_samples": 8, "size": 32, **spec}], "resolution": 32,
            "latent_cache": str(tmp_path / "cache")}})

    recipe_training_data(recipe(), model)
    written = (tmp_path / "cache" / "00-shapes" / "index.json").read_text()
    recipe_training_data(recipe(seed=0), model)  # a default spelt out: the same data, the same cache
    recipe_training_data(recipe(repeat=2), model)
    assert (tmp_path / "cache" / "00-shapes" / "index.json").read_text() == written
    with pytest.raises(ValueError, match="another tokenizer encoder or dataset"):
        recipe_training_data(recipe(seed=1), model)

    # A cache built under the spec as the recipe spelt it is found, and its index moves to the spec as read.
    buckets = AspectRatioBuckets(32, multi_aspect=False)
    spelt = json.dumps({"num_samples": 8, "size": 32, "type": "shapes"}, sort_keys=True) + f" {buckets}"
    folder = tmp_path / "earlier" / "00-shapes"
    build_latent_cache(model.image_tokenizer, ShapesDataset(ShapesConfig(num_samples=8, size=32)), buckets, folder,
                       source=spelt)
    earlier = json.loads((folder / "index.json").read_text())
    before = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.safetensors")}
    data = recipe_training_data(recipe().replace(data=recipe().data.replace(latent_cache=str(tmp_path / "earlier"))),
                                model)
    assert len(data.dataset) == 8 and {p.name: p.stat().st_mtime_ns for p in folder.glob("*.safetensors")} == before
    moved = json.loads((folder / "index.json").read_text())
    assert moved["fingerprint"] != earlier["fingerprint"] and moved["shards"] == earlier["shards"]


def test_editing_and_preference_data_are_refused_before_anything_is_encoded(tmp_path, monkeypatch):
    from nextstep.training.data.editing import ShapesEditingConfig, ShapesEditingDataset

    vae = small_vae()
    monkeypatch.setattr(vae, "encode_seeded", lambda *a, **k: pytest.fail("encoded before the refusal"))
    dataset = ShapesEditingDataset(ShapesEditingConfig(num_samples=4, size=16))
    buckets = AspectRatioBuckets(16, vae.pixels_per_token, multi_aspect=False)
    with pytest.raises(ValueError, match=r"holds editing samples; latent caches store image-caption pairs only"):
        build_latent_cache(vae, dataset, buckets, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_an_index_that_records_no_format_version_is_read_as_format_1_and_kept_for_its_own_tokenizer(tmp_path):
    from nextstep.training.data.latent_cache import _whole_module_fingerprint, _with_source, tokenizer_fingerprint

    vae = small_vae()
    folder = build(vae, tmp_path / "cache", source="shapes")
    index_path = folder / "index.json"
    index = json.loads(index_path.read_text())
    legacy = {key: value for key, value in index.items() if key not in ("format_version", "tokenizer_fingerprint")}
    legacy["fingerprint"] = _with_source(_whole_module_fingerprint(vae), "shapes")
    index_path.write_text(json.dumps(legacy))
    build(vae, folder, source="shapes")  # its own tokenizer keeps it
    upgraded = json.loads(index_path.read_text())
    assert upgraded["format_version"] == 2
    assert upgraded["fingerprint"] == _with_source(tokenizer_fingerprint(vae), "shapes")


def test_cached_and_image_datasets_together_are_refused_unless_the_images_are_cached_too(cache, tmp_path):
    from nextstep.training.recipe import RecipeConfig, recipe_training_data

    _, _, folder = cache
    mixed = {"model": "tiny", "data": {"resolution": 32, "datasets": [
        {"type": "latent_cache", "path": str(folder)}, {"type": "shapes", "num_samples": 8, "size": 32}]}}
    with pytest.raises(ValueError, match=r"data.datasets mixes latent_cache datasets \(tokens\) with datasets of "
                                         r"images \('shapes'\) and a batch cannot hold both; set data.latent_cache"):
        recipe_training_data(RecipeConfig.from_dict(mixed), build_model("tiny", seed=0))
    mixed["data"]["latent_cache"] = str(tmp_path / "more")
    data = recipe_training_data(RecipeConfig.from_dict(mixed), build_model("tiny", seed=0))
    assert len(data.dataset) == 24 + 8


def test_a_batch_of_cached_and_uncached_samples_names_them(cache):
    from nextstep.training.data.loader import collate_samples

    _, dataset, folder = cache
    cached = LatentCacheDataset(LatentCacheConfig(str(folder))).load(0)
    with pytest.raises(ValueError, match=r"a batch holds samples with cached tokens and samples without \(\['shapes"):
        collate_samples([cached, dataset.load(1)], 32, 32)


def test_a_tokenizer_in_bfloat16_builds_its_cache_in_its_own_dtype(tmp_path):
    model = build_model("tiny", seed=0)
    dataset = ShapesDataset(ShapesConfig(num_samples=4, size=32))
    tokenizer = model.image_tokenizer.to(torch.bfloat16)
    build_latent_cache(tokenizer, dataset, AspectRatioBuckets(32, multi_aspect=False), tmp_path, batch_size=4)
    from nextstep.images import from_pil

    sample = LatentCacheDataset(LatentCacheConfig(str(tmp_path))).load(0)
    expected, _, _ = model.encode_images(from_pil([dataset.load(int(sample.key.rsplit("/", 1)[1])).image]))
    assert sample.tokens.dtype == torch.float32
    torch.testing.assert_close(sample.tokens, expected[0].float(), atol=0.05, rtol=0.05)


def test_a_cache_of_a_generated_dataset_whose_samples_changed_is_refused_and_an_older_one_kept(tmp_path, monkeypatch,
                                                                                              caplog):
    from nextstep.training.recipe import RecipeConfig, recipe_training_data

    model = build_model("tiny", seed=0)
    recipe = RecipeConfig.from_dict({"model": "tiny", "data": {"datasets": [
        {"type": "shapes", "num_samples": 8, "size": 32}], "resolution": 32, "latent_cache": str(tmp_path / "c")}})
    recipe_training_data(recipe, model)
    assert json.loads((tmp_path / "c" / "00-shapes" / "index.json").read_text())["built_from"]["dataset"]["contents"]
    load = ShapesDataset.load

    def reworded(self, index):  # as after a change to the captions' wording (or the renderer, a font, ...)
        sample = load(self, index)
        sample.caption = sample.caption.upper()
        return sample

    monkeypatch.setattr(ShapesDataset, "load", reworded)
    with pytest.raises(ValueError, match="another tokenizer encoder or dataset"):
        recipe_training_data(recipe, model)
    monkeypatch.undo()
    # A cache built before datasets were digested by their samples: kept, with a warning.
    buckets = AspectRatioBuckets(32, multi_aspect=False)
    spec = json.dumps({"num_samples": 8, "size": 32, "type": "shapes"}, sort_keys=True) + f" {buckets}"
    build_latent_cache(model.image_tokenizer, ShapesDataset(ShapesConfig(num_samples=8, size=32)), buckets,
                       tmp_path / "old" / "00-shapes", source=spec)
    with caplog.at_level("WARNING"):
        data = recipe_training_data(recipe.replace(data=recipe.data.replace(latent_cache=str(tmp_path / "old"))),
                                    model)
    assert len(data.dataset) == 8 and "was built before its dataset's samples were fingerprinted" in caplog.text


def test_a_shard_that_is_not_the_one_its_index_lists_is_refused(tmp_path):
    model = build_model("tiny", seed=0)
    buckets = AspectRatioBuckets(32, multi_aspect=False)
    build_latent_cache(model.image_tokenizer, ShapesDataset(ShapesConfig(num_samples=12, size=32)), buckets,
                       tmp_path / "a", shard_size=6)
    build_latent_cache(model.image_tokenizer, ShapesDataset(ShapesConfig(num_samples=4, size=32, seed=1)), buckets,
                       tmp_path / "b", shard_size=6)
    (tmp_path / "b" / "shard-00000.safetensors").replace(tmp_path / "a" / "shard-00000.safetensors")  # a race
    with pytest.raises(ValueError, match=r"shard-00000.safetensors holds tokens of shape \(4, 4, 64\) for 4 keys, "
                                         r"but .*index.json lists 6 samples of a \[2, 2\] grid there"):
        LatentCacheDataset(LatentCacheConfig(str(tmp_path / "a")))


def test_a_sampling_tokenizer_caches_the_same_sample_of_each_image_whatever_the_batch_size(tmp_path):
    model = build_model("tiny", seed=0)
    tokenizer = model.image_tokenizer
    tokenizer.config = tokenizer.config.replace(deterministic=False)
    assert tokenizer.samples_latents
    dataset = ShapesDataset(ShapesConfig(num_samples=6, size=32))
    buckets = AspectRatioBuckets(32, multi_aspect=False)
    caches = []
    for batch_size in (2, 3):
        build_latent_cache(tokenizer, dataset, buckets, tmp_path / str(batch_size), batch_size=batch_size)
        cached = LatentCacheDataset(LatentCacheConfig(str(tmp_path / str(batch_size))))
        caches.append({cached.load(i).key: cached.load(i).tokens for i in range(len(cached))})
    assert caches[0].keys() == caches[1].keys()
    for key, tokens in caches[0].items():
        torch.testing.assert_close(caches[1][key], tokens, atol=1e-5, rtol=1e-5)
