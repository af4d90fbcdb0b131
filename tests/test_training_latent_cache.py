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


def test_a_cache_from_another_tokenizer_is_refused(cache):
    _, dataset, folder = cache
    other = build_model("tiny", seed=1)
    with pytest.raises(ValueError, match="another tokenizer or dataset"):
        build_latent_cache(other.image_tokenizer, dataset, AspectRatioBuckets(32, multi_aspect=False), folder)


def test_missing_cache_says_how_to_build_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="build_latent_cache"):
        LatentCacheDataset(LatentCacheConfig(str(tmp_path)))
