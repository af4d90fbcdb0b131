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


def test_training_on_the_cache_matches_training_on_images(cache, tmp_path):
    _, dataset, folder = cache
    buckets = AspectRatioBuckets(32, multi_aspect=False)
    cached = LatentCacheDataset(LatentCacheConfig(str(folder)))
    order = [int(cached.load(i).key.rsplit("/", 1)[1]) for i in range(len(cached))]

    class Reordered(ShapesDataset):
        # The cache groups samples by bucket; give the image run the same index order.
        def load(self, index):
            return super().load(order[index])

    images = Reordered(dataset.config)
    config = tiny_config(max_steps=3, micro_batch_size=4)
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
    return build_latent_cache(tokenizer, dataset, AspectRatioBuckets(16, multi_aspect=False), folder,
                              batch_size=6, **kwargs)


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
    assert len(cached) == 19 and cached.scanned == 20
    assert len(cached.known_bad) == 1 and "05.png" in cached.known_bad[0]
    assert TrainingData(cached, AspectRatioBuckets(32, multi_aspect=False)).known_bad == cached.known_bad


def test_a_cache_of_a_sampling_tokenizer_warns_that_it_keeps_one_sample(tmp_path, caplog):
    from nextstep.tokenizers import FluxVAE, FluxVAEConfig

    sampling = FluxVAE(FluxVAEConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4, z_channels=4,
                                     deterministic=False)).eval()
    with caplog.at_level("WARNING", logger="nextstep.training"):
        build(sampling, tmp_path / "cache")
    assert "keeps one sample per image" in caplog.text
