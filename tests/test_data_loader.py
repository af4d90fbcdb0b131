"""The batch plan: deterministic, one bucket per batch, rank slices that tile the global batch."""

from hypothesis import given
from hypothesis import strategies as st

from nextstep.training.data.loader import BatchLayout, BatchPlan, RankSampler


def _groups(n):
    return [("a", "b", "c")[i % 3] for i in range(n)]


@given(st.integers(12, 200), st.integers(1, 4), st.integers(0, 10))
def test_plan_is_deterministic_and_each_batch_is_one_bucket(n, size, seed):
    groups = _groups(n)
    plan, again = BatchPlan(groups, size, seed), BatchPlan(groups, size, seed)
    for step in range(plan.batches_per_epoch * 2):
        batch = plan.global_batch(step)
        assert batch == again.global_batch(step)
        assert len(batch) == size and len({groups[i] for i in batch}) == 1
    epoch = [i for b in plan.epoch_batches(0) for i in b]
    assert len(epoch) == len(set(epoch))  # nothing twice in an epoch


@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3))
def test_rank_micro_batches_tile_the_global_batch(micro, accumulation, world):
    layout = BatchLayout(micro, accumulation, world)
    plan = BatchPlan(_groups(120), layout.global_batch_size, seed=1)
    sizes = [(32, 32)] * 120
    for step in range(3):
        pieces = {}
        for rank in range(world):
            sampler = iter(RankSampler(plan, layout, rank, step, sizes))
            for accumulation_index in range(accumulation):
                indices, _ = next(sampler)
                pieces[layout.slot(accumulation_index, rank)] = indices
        assert [i for slot in sorted(pieces) for i in pieces[slot]] == plan.global_batch(step)


def test_starting_at_a_step_equals_skipping_to_it():
    layout = BatchLayout(2, 2, 1)
    plan = BatchPlan(_groups(60), layout.global_batch_size, seed=3)
    sizes = [(32, 32)] * 60
    full = iter(RankSampler(plan, layout, 0, 0, sizes))
    from_five = iter(RankSampler(plan, layout, 0, 5, sizes))
    skipped = [next(full) for _ in range(10)]
    assert [next(full) for _ in range(6)] == [next(from_five) for _ in range(6)]
    assert skipped


def test_a_bucket_smaller_than_a_global_batch_is_named(caplog):
    groups = ["square"] * 10 + ["wide"] * 3
    with caplog.at_level("WARNING", logger="nextstep.training"):
        plan = BatchPlan(groups, 4, seed=0)
    assert plan.batches_per_epoch == 2
    assert "3 sample(s) in bucket(s) smaller than a global batch of 4 are never trained" in caplog.text
    assert "'wide': 3" in caplog.text and "'square'" not in caplog.text


def test_each_epoch_has_its_own_order():
    from nextstep.training.data.loader import BatchPlan
    plan = BatchPlan([(32, 32)] * 64, 4, seed=0)
    first = [list(b) for b in plan.epoch_batches(0)]
    assert first != [list(b) for b in plan.epoch_batches(1)]


def test_micro_batch_slots_are_accumulation_major():
    from nextstep.training.data.loader import BatchLayout
    layout = BatchLayout(micro_batch_size=2, gradient_accumulation=2, world_size=2)
    assert [layout.slot(a, r) for a in range(2) for r in range(2)] == [0, 1, 2, 3]
    assert layout.slot(1, 0) == 2 and layout.slot(0, 1) == 1


class _Lettered:
    """A map-style dataset of ``count`` samples named ``<letter><index>``."""

    def __init__(self, letter, count):
        self.letter, self.count = letter, count

    def __len__(self):
        return self.count

    def load(self, index):
        from nextstep.training.data.base import ImageTextSample

        assert 0 <= index < self.count, index
        return ImageTextSample(key=f"{self.letter}{index}", caption=f"{self.letter}{index}")

    def image_size(self, index):
        assert 0 <= index < self.count, index
        return (16, 16)

    def caption(self, index):
        assert 0 <= index < self.count, index
        return f"{self.letter}{index}"


def test_a_repeated_dataset_is_listed_whole_that_many_times_before_the_next():
    import pytest

    from nextstep.training.data.mixture import ConcatImageTextDataset

    mixture = ConcatImageTextDataset([_Lettered("a", 2), _Lettered("b", 3)], repeats=[2, 1])
    order = ["a0", "a1", "a0", "a1", "b0", "b1", "b2"]
    assert len(mixture) == 7
    assert [mixture.caption(i) for i in range(7)] == order
    assert [mixture.load(i).key for i in range(7)] == order
    assert [mixture.image_size(i) for i in range(7)] == [(16, 16)] * 7
    for outside in (7, -1):
        with pytest.raises(IndexError):
            mixture.caption(outside)


class _Corrupt(_Lettered):
    """`_Lettered`, but loading the indices in ``broken`` fails as a corrupt sample."""

    def __init__(self, letter, count, broken):
        super().__init__(letter, count)
        self.broken = set(broken)

    def load(self, index):
        from PIL import Image

        from nextstep.training.data.base import CorruptSampleError

        if index in self.broken:
            raise CorruptSampleError(f"{self.letter}{index}", "truncated")
        sample = super().load(index)
        sample.image = Image.new("RGB", (16, 16), (index * 40, 0, 0))
        return sample


def test_an_unreadable_sample_is_replaced_by_the_next_readable_one_of_its_own_bucket():
    from nextstep.training.data.loader import BatchAssembler

    groups = ["wide", "square", "wide", "square", "square"]
    assembler = BatchAssembler(_Corrupt("s", 5, broken={1}), groups)
    batch = assembler[([0, 1], (16, 16))]
    assert batch.keys == ["s0", "s3"]  # s2 comes next but lies in the wide bucket
    assert batch.bad_keys == ["s1 (truncated)"]
    assert batch.attempted == 3  # two samples, one of them read twice


def test_a_bucket_whose_every_sample_is_unreadable_stops_with_a_data_quality_error():
    import pytest

    from nextstep.training.data.base import DataQualityError
    from nextstep.training.data.loader import BatchAssembler

    assembler = BatchAssembler(_Corrupt("s", 4, broken={1, 3}), ["a", "b", "a", "b"])
    with pytest.raises(DataQualityError, match="2 samples in a row could not be read near index 1"):
        assembler[([1], (16, 16))]


def test_collated_images_are_fitted_to_the_buckets_height_and_width_keeping_the_centre():
    from PIL import Image

    from nextstep.training.data.base import ImageTextSample
    from nextstep.training.data.loader import collate_samples

    # 60 x 20: a red left third, a green middle third, a blue right third.
    image = Image.new("RGB", (60, 20), (255, 0, 0))
    image.paste((0, 255, 0), (20, 0, 40, 20))
    image.paste((0, 0, 255), (40, 0, 60, 20))
    tall = collate_samples([ImageTextSample(key="t", caption="t", image=image)], 16, 8)
    assert tall.images.shape == (1, 3, 16, 8)
    # Scaled by 0.8 to cover the 16 rows, then the centre 8 of its 48 columns kept: all green.
    assert (tall.images[0, 1] > 0.9).all() and (tall.images[0, 0] < -0.9).all() and (tall.images[0, 2] < -0.9).all()
    wide = collate_samples([ImageTextSample(key="w", caption="w", image=image)], 8, 16)
    assert wide.images.shape == (1, 3, 8, 16)


def test_a_single_dataset_spec_with_a_repeat_is_listed_that_many_times():
    from nextstep.training.data.source import DataConfig, build_training_data

    data = build_training_data(DataConfig(datasets=({"type": "shapes", "num_samples": 5, "size": 16, "repeat": 3},)))
    assert len(data.dataset) == 15
    assert [data.dataset.caption(i) for i in range(5, 15)] == [data.dataset.caption(i) for i in range(5)] * 2
    assert data.size == 5  # distinct samples, the base of the bad-sample share
    once = build_training_data(DataConfig(datasets=({"type": "shapes", "num_samples": 5, "size": 16},)))
    assert len(once.dataset) == 5
