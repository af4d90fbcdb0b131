"""Several map-style datasets as one, each optionally repeated."""

from __future__ import annotations

import bisect

from nextstep.training.data.base import ImageTextDataset, ImageTextSample, sample_kind_of


class ConcatImageTextDataset(ImageTextDataset):
    """The samples of ``datasets`` one after another; dataset ``i`` appears ``repeats[i]`` times.

    Repeating a small dataset raises its share of every epoch (emoji beside a
    large shapes set, say).

    Args:
        datasets: map-style datasets.
        repeats: how often each dataset is listed (default once each).
    """

    def __init__(self, datasets: list[ImageTextDataset], repeats: list[int] | None = None):
        if not datasets:
            raise ValueError("expected at least one dataset, found none")
        repeats = list(repeats or [1] * len(datasets))
        if len(repeats) != len(datasets) or any(r < 1 for r in repeats):
            raise ValueError(f"repeats must be one integer >= 1 per dataset, found {repeats}")
        kinds = {sample_kind_of(d) for d in datasets}
        if len(kinds) > 1:
            listed = ", ".join(f"{d.describe()}: {sample_kind_of(d)}" for d in datasets)
            raise ValueError(f"datasets of one sample kind can be trained together, found several ({listed}): a "
                             "batch holds samples of one kind (an edit's source image, a preference's rejected "
                             "image); train them in separate runs")
        self.sample_kind = kinds.pop()
        self.datasets = datasets
        self.repeats = repeats
        self.offsets = [0]
        for dataset, repeat in zip(datasets, repeats):
            self.offsets.append(self.offsets[-1] + len(dataset) * repeat)
        self.known_bad = [key for d in datasets for key in getattr(d, "known_bad", [])]
        # Distinct samples (repeats read the same files), the base of the bad-sample share.
        self.scanned = sum(getattr(d, "scanned", len(d)) for d in datasets)

    def __len__(self) -> int:
        return self.offsets[-1]

    def _locate(self, index: int) -> tuple[ImageTextDataset, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index must be in [0, {len(self)}), found {index}")
        which = bisect.bisect_right(self.offsets, index) - 1
        dataset = self.datasets[which]
        return dataset, (index - self.offsets[which]) % len(dataset)

    def load(self, index: int) -> ImageTextSample:
        dataset, local = self._locate(index)
        return dataset.load(local)

    def image_size(self, index: int) -> tuple[int, int]:
        dataset, local = self._locate(index)
        return dataset.image_size(local)

    def caption(self, index: int) -> str:
        dataset, local = self._locate(index)
        return dataset.caption(local)

    def check_buckets(self, buckets) -> None:
        for dataset in self.datasets:
            dataset.check_buckets(buckets)

    def describe(self) -> str:
        parts = [f"{d.describe()} x{r}" if r > 1 else d.describe() for d, r in zip(self.datasets, self.repeats)]
        return " + ".join(parts)
