"""WebDataset tar shards: streamed, bucketed on the fly, resumable by replay, strict about captions."""

import io
import itertools
import tarfile

import pytest
from PIL import Image

from nextstep.training.data import AspectRatioBuckets, BatchLayout, WebDataset, WebDatasetConfig
from nextstep.training.data.webdataset import StreamingTrainingBatches, expand_braces, read_shard


def _png(colour, size) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _add(archive, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def write_shards(folder, num_shards=4, per_shard=12, broken=(), uncaptioned=(), truncated=(), captions=None):
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(num_shards):
        with tarfile.open(folder / f"train-{shard:03d}.tar", "w") as archive:
            for item in range(per_shard):
                key = f"s{shard}_{item:03d}"
                size = (48, 32) if item % 3 == 0 else (32, 32)
                image = b"garbage" if key in broken else _png((shard * 40, item * 10, 0), size)
                if key in truncated:  # the header reads, the pixels do not
                    image = image[:60]
                _add(archive, f"{key}.png", image)
                if key not in uncaptioned:
                    _add(archive, f"{key}.txt", (captions or {}).get(key, f"caption of {key}".encode()))
    return str(folder / f"train-{{000..{num_shards - 1:03d}}}.tar")


def test_brace_patterns_expand_with_padding():
    assert expand_braces("a-{08..10}.tar") == ["a-08.tar", "a-09.tar", "a-10.tar"]


def test_shards_stream_every_sample_once_per_epoch(tmp_path):
    pattern = write_shards(tmp_path)
    dataset = WebDataset(WebDatasetConfig(shards=(pattern,), shuffle_buffer=5))
    assert len(dataset.shards) == 4
    keys = [raw.key for raw, _ in itertools.islice(dataset.stream(0, 1, seed=0), 48)]
    assert sorted(keys) == sorted(r.key for s in dataset.shards for r in read_shard(s))
    halves = [[r.key for r, _ in itertools.islice(dataset.stream(slot, 2, seed=0), 24)] for slot in (0, 1)]
    assert not set(halves[0]) & set(halves[1])
    epochs = [raw.epoch for raw, _ in itertools.islice(dataset.stream(0, 1, seed=0), 120)]
    assert epochs == [0] * 48 + [1] * 48 + [2] * 24


def test_stream_batches_name_the_pass_over_the_shards_they_come_from(tmp_path):
    dataset = WebDataset(WebDatasetConfig(shards=(write_shards(tmp_path),), shuffle_buffer=1))
    layout = BatchLayout(micro_batch_size=4)
    # 48 images of one bucket a pass: 12 batches each, the last of a pass made before the next pass begins.
    buckets = AspectRatioBuckets(32, multi_aspect=False)
    batches = list(itertools.islice(iter(StreamingTrainingBatches(dataset, buckets, layout)), 30))
    assert [batch.epoch for batch in batches] == [0] * 12 + [1] * 12 + [2] * 6


def _keys(loader, count):
    return [tuple(batch.keys) for batch in itertools.islice(iter(loader), count)]


@pytest.mark.parametrize("workers", [0, 2])
def test_resuming_the_stream_continues_where_it_stopped(tmp_path, workers):
    dataset = WebDataset(WebDatasetConfig(shards=(write_shards(tmp_path),), shuffle_buffer=4))
    buckets = AspectRatioBuckets(32, multi_aspect=True)
    layout = BatchLayout(micro_batch_size=2, gradient_accumulation=2)
    full = _keys(StreamingTrainingBatches(dataset, buckets, layout, num_workers=workers), 12)
    resumed = _keys(StreamingTrainingBatches(dataset, buckets, layout, start_step=3, num_workers=workers), 6)
    assert resumed == full[6:]
    single = BatchLayout(micro_batch_size=2)  # resumed at an odd batch: another worker's turn comes first
    full = _keys(StreamingTrainingBatches(dataset, buckets, single, num_workers=workers), 8)
    resumed = _keys(StreamingTrainingBatches(dataset, buckets, single, start_step=3, num_workers=workers), 5)
    assert resumed == full[3:]
    batch = next(iter(StreamingTrainingBatches(dataset, buckets, layout)))
    assert batch.images.shape[0] == 2 and batch.captions[0].startswith("caption of")


def test_broken_images_are_counted_and_skipped(tmp_path):
    pattern = write_shards(tmp_path, num_shards=1, per_shard=20, broken={"s0_004"})
    dataset = WebDataset(WebDatasetConfig(shards=(pattern,), shuffle_buffer=0))
    loader = StreamingTrainingBatches(dataset, AspectRatioBuckets(32, multi_aspect=False), BatchLayout(4))
    batches = list(itertools.islice(iter(loader), 4))
    bad = [key for batch in batches for key in batch.bad_keys]
    assert len(bad) == 1 and "s0_004" in bad[0]
    assert all("s0_004" not in key for batch in batches for key in batch.keys)


def test_a_batch_whose_pixels_all_fail_still_counts_and_is_reported(tmp_path):
    """With one image per batch, a sample whose header reads but whose pixels do not makes its batch from the
    bucket's last good sample: the stream's batches stay one per group of headers, as a resumed stream counts
    them, and the failure reaches the bad-sample count."""
    pattern = write_shards(tmp_path, num_shards=1, per_shard=12, truncated={"s0_004"})
    dataset = WebDataset(WebDatasetConfig(shards=(pattern,), shuffle_buffer=0))
    buckets, layout = AspectRatioBuckets(32, multi_aspect=False), BatchLayout(1, gradient_accumulation=2)
    full = list(itertools.islice(iter(StreamingTrainingBatches(dataset, buckets, layout)), 8))
    assert [batch.keys[0].split(":")[1] for batch in full[3:5]] == ["s0_003", "s0_003"]
    assert any("s0_004" in key for batch in full for key in batch.bad_keys)
    resumed = _keys(StreamingTrainingBatches(dataset, buckets, layout, start_step=2), 4)
    assert resumed == [tuple(batch.keys) for batch in full[4:8]]


def test_missing_caption_names_the_sample_and_the_shard(tmp_path):
    pattern = write_shards(tmp_path, num_shards=1, uncaptioned={"s0_002"})
    dataset = WebDataset(WebDatasetConfig(shards=(pattern,), shuffle_buffer=0))
    loader = StreamingTrainingBatches(dataset, AspectRatioBuckets(32), BatchLayout(2))
    with pytest.raises(ValueError, match=r"'s0_002' in shard .*train-000\.tar has no caption"):
        list(itertools.islice(iter(loader), 5))


def test_captions_lose_a_byte_order_mark_and_undecodable_ones_count_as_bad_samples(tmp_path):
    captions = {"s0_000": "\ufeff a red circle \n".encode(), "s0_001": "caf\xe9".encode("latin-1")}
    pattern = write_shards(tmp_path, num_shards=1, per_shard=6, captions=captions)
    dataset = WebDataset(WebDatasetConfig(shards=(pattern,), shuffle_buffer=0))
    loader = StreamingTrainingBatches(dataset, AspectRatioBuckets(32, multi_aspect=False), BatchLayout(1))
    batches = list(itertools.islice(iter(loader), 5))
    assert batches[0].captions == ["a red circle"]
    assert any("s0_001" in key and "not UTF-8" in key for batch in batches for key in batch.bad_keys)
    assert all("s0_001" not in key for batch in batches for key in batch.keys)


def test_missing_shards_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere-1.tar"):
        WebDataset(WebDatasetConfig(shards=(str(tmp_path / "nowhere-{0..1}.tar"),)))


def test_a_stream_with_no_usable_sample_stops_after_one_pass_naming_what_it_found(tmp_path):
    from nextstep.training.data.base import DataQualityError

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buffer, format="BMP")
    with tarfile.open(tmp_path / "bmp.tar", "w") as archive:
        for item in range(3):
            _add(archive, f"k{item}.bmp", buffer.getvalue())
            _add(archive, f"k{item}.txt", b"caption")
    (tmp_path / "broken.tar").write_bytes(b"not a tar file" * 40)
    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    buckets = AspectRatioBuckets(32, multi_aspect=False)
    for shards, found in (("bmp.tar", r"found member extensions \['bmp', 'txt'\]"),
                          ("broken.tar", r"found no member \(1 of 1 shards are unreadable tars")):
        dataset = WebDataset(WebDatasetConfig(shards=(str(tmp_path / shards),)))
        with pytest.raises(DataQualityError, match=r"after a full pass over its shards: expected an image member with "
                                                   r"an extension among image_keys \['jpg', 'jpeg', 'png', 'webp'\].*"
                                                   + found):
            next(iter(StreamingTrainingBatches(dataset, buckets, BatchLayout(2))))
    dataset = WebDataset(WebDatasetConfig(shards=(str(tmp_path / "empty.tar"),)))
    with pytest.raises(DataQualityError, match=r"holds no sample: expected tar members named key.extension"):
        next(iter(StreamingTrainingBatches(dataset, buckets, BatchLayout(2))))
    # An empty tar beside unusable ones: the passes count the shards dealt, the empty one too.
    import signal

    class ReadsOn(BaseException):  # not an OSError, which the tar reader takes for a broken shard
        pass

    def took_too_long(*_):
        raise ReadsOn("the stream read on without a usable sample")

    previous = signal.signal(signal.SIGALRM, took_too_long)
    signal.alarm(60)
    try:
        dataset = WebDataset(WebDatasetConfig(shards=(str(tmp_path / "empty.tar"), str(tmp_path / "bmp.tar"))))
        with pytest.raises(DataQualityError, match=r"found member extensions \['bmp', 'txt'\]"):
            next(iter(StreamingTrainingBatches(dataset, buckets, BatchLayout(2))))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    # Each process reads every shard before it gives up: one whose first shards are unusable reads on.
    pattern = write_shards(tmp_path / "good", num_shards=1, per_shard=4)
    dataset = WebDataset(WebDatasetConfig(shards=(pattern, str(tmp_path / "bmp.tar"), str(tmp_path / "broken.tar")),
                                          shuffle_buffer=0))
    for rank in range(3):
        batch = next(iter(StreamingTrainingBatches(dataset, AspectRatioBuckets(32, multi_aspect=True),
                                                   BatchLayout(2, world_size=3), rank=rank)))
        assert len(batch.keys) == 2


def test_repeat_is_refused_for_a_stream_naming_the_dataset():
    from nextstep.training.data import DataConfig

    with pytest.raises(ValueError, match=r"datasets\[1\].repeat must be 1 \(or left out\) for a webdataset dataset: "
                                         r"repeat lists a map-style dataset n times per epoch, while a stream passes "
                                         r"over its shards once per epoch, found 2"):
        DataConfig(datasets=({"type": "shapes"}, {"type": "webdataset", "shards": ["x.tar"], "repeat": 2}))
    DataConfig(datasets=({"type": "webdataset", "shards": ["x.tar"], "repeat": 1},))


def test_the_shuffle_buffer_yields_once_it_holds_its_size(tmp_path, monkeypatch):

    from nextstep.training.data import WebDataset, WebDatasetConfig
    from nextstep.training.data import webdataset as wds
    dataset = WebDataset(WebDatasetConfig(shards=(write_shards(tmp_path, num_shards=1),), shuffle_buffer=4))
    read = []
    real = wds.read_shard
    def counting(path):
        for raw in real(path):
            read.append(raw.key)
            yield raw
    monkeypatch.setattr(wds, "read_shard", counting)
    next(dataset.stream(0, 1, seed=0))
    assert len(read) == 4


def test_a_batch_spanning_two_passes_is_named_by_the_later(tmp_path):

    from nextstep.training.data import AspectRatioBuckets, BatchLayout, WebDataset, WebDatasetConfig
    from nextstep.training.data.webdataset import StreamingTrainingBatches
    dataset = WebDataset(WebDatasetConfig(shards=(write_shards(tmp_path, num_shards=1, per_shard=5),),
                                          shuffle_buffer=1))
    buckets = AspectRatioBuckets(32, multi_aspect=False)
    batches = list(itertools.islice(iter(StreamingTrainingBatches(dataset, buckets, BatchLayout(3))), 2))
    assert [b.epoch for b in batches] == [0, 1]  # second batch: 2 samples of pass 0, 1 of pass 1


def test_a_sample_key_is_the_name_up_to_its_first_dot(tmp_path):
    """WebDataset convention: ``k1.seg.png`` is member ``seg.png`` of sample ``k1``."""
    path = tmp_path / "dotted.tar"
    with tarfile.open(path, "w") as archive:
        for name in ("k1.jpg", "k1.seg.png", "k1.txt", "k2.txt"):
            _add(archive, name, name.encode())
    samples = list(read_shard(path))
    assert [sample.key for sample in samples] == ["k1", "k2"]
    assert samples[0].members == {"jpg": b"k1.jpg", "seg.png": b"k1.seg.png", "txt": b"k1.txt"}
