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


def _samples_of_named_members(path, names):
    """Write a shard whose members each hold their own name as bytes, and read its samples back."""
    with tarfile.open(path, "w") as archive:
        for name in names:
            _add(archive, name, name.encode())
    return list(read_shard(path))


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
    assert expand_braces("a-{1..03}.tar") == ["a-01.tar", "a-02.tar", "a-03.tar"]  # as a shell pads it
    assert expand_braces("a-{9..10}.tar") == ["a-9.tar", "a-10.tar"]
    assert expand_braces("{0..1}-{00..01}") == ["0-00", "0-01", "1-00", "1-01"]
    with pytest.raises(ValueError, match=r"shard pattern 'a-\{a..c\}.tar': expected a range of numbers such as "
                                         r"\{000..099\}, found \{a..c\}"):
        expand_braces("a-{a..c}.tar")


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
    samples = _samples_of_named_members(tmp_path / "dotted.tar", ("k1.jpg", "k1.seg.png", "k1.txt", "k2.txt"))
    assert [sample.key for sample in samples] == ["k1", "k2"]
    assert samples[0].members == {"jpg": b"k1.jpg", "seg.png": b"k1.seg.png", "txt": b"k1.txt"}


def test_member_extensions_are_lower_cased_so_upper_case_images_are_found(tmp_path):
    """``K1.PNG`` and ``K1.TXT`` are members ``png`` and ``txt`` of sample ``K1`` (keys keep their case)."""
    path = tmp_path / "upper.tar"
    with tarfile.open(path, "w") as archive:
        _add(archive, "K1.PNG", _png((255, 0, 0), (32, 32)))
        _add(archive, "K1.TXT", b"a red square")
    (sample,) = read_shard(path)
    assert sample.key == "K1" and sorted(sample.members) == ["png", "txt"]
    dataset = WebDataset(WebDatasetConfig(shards=(str(path),)))
    assert dataset.image_bytes(sample)[0] == "png" and dataset.decode_caption(sample) == "a red square"


def test_a_sample_key_keeps_its_folder_so_equal_names_in_two_folders_are_two_samples(tmp_path):
    """Members ``a/x.*`` and ``b/x.*`` are samples ``a/x`` and ``b/x``, not one sample ``x``."""
    samples = _samples_of_named_members(tmp_path / "folders.tar", ("a/x.jpg", "a/x.txt", "b/x.jpg", "b/x.txt"))
    assert [sample.key for sample in samples] == ["a/x", "b/x"]
    assert [sample.members for sample in samples] == [{"jpg": b"a/x.jpg", "txt": b"a/x.txt"},
                                                       {"jpg": b"b/x.jpg", "txt": b"b/x.txt"}]


def test_folders_and_links_in_a_shard_are_passed_over(tmp_path):
    """Only regular files are members: a directory entry and a symbolic link are skipped, the shard still reads."""
    path = tmp_path / "links.tar"
    with tarfile.open(path, "w") as archive:
        folder = tarfile.TarInfo("k0")
        folder.type = tarfile.DIRTYPE
        archive.addfile(folder)
        _add(archive, "k0/a.txt", b"in a folder")
        link = tarfile.TarInfo("k1.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "k0/a.txt"
        archive.addfile(link)
        _add(archive, "k1.txt", b"beside a link")
    assert [(sample.key, sample.members) for sample in read_shard(path)] == [
        ("k0/a", {"txt": b"in a folder"}), ("k1", {"txt": b"beside a link"})]


def test_glob_patterns_list_their_shards_in_name_order(tmp_path):
    """Shards matched by a glob pattern are listed sorted by path, whatever order the folder lists them in."""
    names = [f"part-{number:02d}.tar" for number in range(24)]
    for name in reversed(names):
        with tarfile.open(tmp_path / name, "w") as archive:
            _add(archive, "k.txt", b"x")
    dataset = WebDataset(WebDatasetConfig(shards=(str(tmp_path / "part-*.tar"),)))
    assert dataset.shards == [str(tmp_path / name) for name in names]


def test_the_image_member_is_the_first_of_image_keys_in_their_given_order(tmp_path):
    """A sample with both a ``png`` and a ``jpg`` member gives the one listed first in ``image_keys``."""
    from nextstep.training.data.webdataset import RawSample

    raw = RawSample("k", "shard.tar", {"jpg": b"jpeg bytes", "png": b"png bytes", "txt": b"caption"})
    shard = write_shards(tmp_path, num_shards=1, per_shard=1)
    for keys, expected in ((("png", "jpg"), ("png", b"png bytes")), (("jpg", "png"), ("jpg", b"jpeg bytes")),
                           (("webp", "png"), ("png", b"png bytes"))):
        dataset = WebDataset(WebDatasetConfig(shards=(shard,), image_keys=keys))
        assert dataset.image_bytes(raw) == expected


def test_each_pass_deals_the_shards_anew(tmp_path):
    """The shards a reader reads change from pass to pass (a seeded shuffle per epoch), while every pass deals
    each shard to exactly one of the readers."""
    dataset = WebDataset(WebDatasetConfig(shards=(write_shards(tmp_path, num_shards=8, per_shard=1),)))
    for epoch in range(4):
        dealt = [dataset.dealt(slot, 2, seed=0, epoch=epoch) for slot in range(2)]
        assert sorted(dealt[0] + dealt[1]) == sorted(dataset.shards) and len(dealt[0]) == 4
    orders = {tuple(dataset.dealt(0, 2, seed=0, epoch=epoch)) for epoch in range(4)}
    assert len(orders) > 1
    assert dataset.dealt(0, 2, seed=0, epoch=1) == dataset.dealt(0, 2, seed=0, epoch=1)


def test_readers_shuffle_their_samples_independently(tmp_path):
    """The shuffle buffer is seeded per reader slot: two readers fed shards of one layout (12 samples each) do
    not draw the same permutation of them."""
    dataset = WebDataset(WebDatasetConfig(shards=(write_shards(tmp_path, num_shards=2, per_shard=12),),
                                          shuffle_buffer=4))
    positions = [[raw.key.split("_")[1] for raw, _ in itertools.islice(dataset.stream(slot, 2, seed=0), 12)]
                 for slot in (0, 1)]
    assert sorted(positions[0]) == sorted(positions[1]) == [f"{item:03d}" for item in range(12)]
    assert positions[0] != positions[1]


def test_streamed_images_are_bucketed_by_their_width_over_height(tmp_path):
    """A 48x32 (wide) picture goes to the wide 48x80 bucket of 64 px buckets, a 32x32 one to the square 64x64:
    batches hold (B, 3, H, W) images of the bucket of each of their samples."""
    dataset = WebDataset(WebDatasetConfig(shards=(write_shards(tmp_path, num_shards=1, per_shard=12),),
                                          shuffle_buffer=0))
    buckets = AspectRatioBuckets(64, multi_aspect=True)
    assert buckets.assign(48, 32) == (48, 80)
    batches = list(itertools.islice(iter(StreamingTrainingBatches(dataset, buckets, BatchLayout(2))), 6))
    shapes = {}
    for batch in batches:
        for key in batch.keys:
            wide = int(key.split("_")[-1]) % 3 == 0  # write_shards makes every third picture 48 wide, 32 tall
            shapes[key] = (tuple(batch.images.shape[1:]), wide)
    assert len(shapes) == 12
    assert all(shape == ((3, 48, 80) if wide else (3, 64, 64)) for shape, wide in shapes.values())


def test_a_sample_whose_pixels_fail_is_replaced_so_the_batch_keeps_its_size(tmp_path):
    """With 4 samples a batch, a picture whose header reads but whose pixels do not is reported and stands in
    for by a good sample of its batch: the batch still holds (4, 3, 32, 32) images and 4 keys."""
    pattern = write_shards(tmp_path, num_shards=1, per_shard=8, truncated={"s0_001"})
    dataset = WebDataset(WebDatasetConfig(shards=(pattern,), shuffle_buffer=0))
    loader = StreamingTrainingBatches(dataset, AspectRatioBuckets(32, multi_aspect=False), BatchLayout(4))
    first, second = itertools.islice(iter(loader), 2)
    assert first.images.shape == (4, 3, 32, 32) and len(first.keys) == len(first.captions) == 4
    assert all("s0_001" not in key for key in first.keys)
    assert len(first.bad_keys) == 1 and "s0_001" in first.bad_keys[0]
    assert {key.split(":")[-1] for key in first.keys} <= {"s0_000", "s0_002", "s0_003"}
    assert second.bad_keys == [] and [key.split(":")[-1] for key in second.keys] == [f"s0_{i:03d}" for i in range(4, 8)]


def test_a_resumed_stream_finds_a_stand_in_behind_several_broken_groups(tmp_path):
    """Three pictures in a row whose pixels fail (one a batch): a stream resumed at the third still makes its
    batch from the last good picture before them, as the uninterrupted stream does."""
    pattern = write_shards(tmp_path, num_shards=1, per_shard=12, truncated={"s0_003", "s0_004", "s0_005"})
    dataset = WebDataset(WebDatasetConfig(shards=(pattern,), shuffle_buffer=0))
    buckets, layout = AspectRatioBuckets(32, multi_aspect=False), BatchLayout(1)
    full = _keys(StreamingTrainingBatches(dataset, buckets, layout), 8)
    assert [keys[0].split(":")[-1] for keys in full[3:7]] == ["s0_002", "s0_002", "s0_002", "s0_006"]
    assert _keys(StreamingTrainingBatches(dataset, buckets, layout, start_step=5), 3) == full[5:8]
