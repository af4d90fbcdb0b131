"""Photo crops: the held-out split reads the held-out photos, and each index is its own crop."""


def test_held_out_crops_come_from_held_out_photos():
    from nextstep.evaluation.photo_bank import load_photos, split_photos
    from nextstep.training.data.photos import PhotoCropsConfig, PhotoCropsDataset

    train, held_out = split_photos(load_photos())
    for split, photos in (("held_out", held_out), ("train", train)):
        dataset = PhotoCropsDataset(PhotoCropsConfig(split=split, num_samples=4))
        assert [photo.name for photo in dataset.photos] == [photo.name for photo in photos]


def test_each_index_is_its_own_crop():
    import numpy as np

    from nextstep.training.data.photos import PhotoCropsConfig, PhotoCropsDataset

    dataset = PhotoCropsDataset(PhotoCropsConfig(num_samples=4, size=32))
    a, b = (np.asarray(dataset.load(i).image) for i in (0, 1))
    assert not np.array_equal(a, b)
