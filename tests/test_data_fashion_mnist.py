"""Fashion-MNIST from the Debian package, with templated captions."""

import pytest

from nextstep.training.data import fashion_mnist
from nextstep.training.data.fashion_mnist import CLASS_NAMES, FashionMNISTConfig, FashionMNISTDataset

pytestmark = pytest.mark.skipif(not fashion_mnist.DATA_DIR.is_dir(),
                                reason="Fashion-MNIST not installed; run `make data`")


def test_splits_sizes_and_captions():
    train = FashionMNISTDataset(FashionMNISTConfig(split="train"))
    test = FashionMNISTDataset(FashionMNISTConfig(split="test", size=16, limit=100))
    assert len(train) == 60_000 and len(test) == 100
    sample = test.load(7)
    assert sample.image.size == (16, 16) and sample.image.mode == "RGB"
    assert CLASS_NAMES[sample.metadata["label"]] in sample.caption
    assert " a a" not in sample.caption and "a ankle" not in train.caption(0)


def test_missing_files_name_the_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        fashion_mnist.load_arrays("test", tmp_path)
