"""Counting unreadable samples, and stopping a run that has too many."""

from __future__ import annotations

import logging
from typing import Iterable

from nextstep.training.data.base import DataQualityError

logger = logging.getLogger("nextstep.training")

#: With no known dataset size, the fraction is judged only after this many reads.
MIN_READS_FOR_RATE = 100


class BadSampleTracker:
    """Warns about each unreadable sample once and raises when too many are bad.

    With a known dataset size the limit is ``max_fraction * size`` distinct bad
    samples (reached as soon as it is certain, however early); for streams of
    unknown size it is ``max_fraction`` of the samples read, checked after
    `MIN_READS_FOR_RATE` reads.

    Args:
        max_fraction: the largest tolerated share of bad samples.
        dataset_size: number of samples, if known.
        initial_bad: keys already found bad (e.g. while scanning file headers).
        initial_total: samples already examined when ``initial_bad`` was found.
    """

    def __init__(self, max_fraction: float = 0.01, dataset_size: int | None = None,
                 initial_bad: Iterable[str] = (), initial_total: int = 0):
        self.max_fraction = max_fraction
        self.dataset_size = dataset_size
        self.bad: set[str] = set()
        self.reads = initial_total
        for key in initial_bad:
            self._record(key)
        self.check()

    @property
    def num_bad(self) -> int:
        return len(self.bad)

    def update(self, attempted: int, bad_keys: Iterable[str]) -> None:
        """Account for one batch: ``attempted`` reads of which ``bad_keys`` failed."""
        self.reads += attempted
        for key in bad_keys:
            self._record(key)
        self.check()

    def _record(self, key: str) -> None:
        if key not in self.bad:
            self.bad.add(key)
            logger.warning("skipped unreadable sample %s (%d bad so far)", key, len(self.bad))

    def check(self) -> None:
        """Raise `DataQualityError` if the bad share is over the limit."""
        if not self.bad:
            return
        if self.dataset_size is not None:
            limit = self.max_fraction * self.dataset_size
            base = f"of the {self.dataset_size} samples"
        else:
            if self.reads < MIN_READS_FOR_RATE and len(self.bad) < MIN_READS_FOR_RATE:
                return
            limit = self.max_fraction * max(self.reads, 1)
            base = f"of the {self.reads} samples read"
        if len(self.bad) > limit:
            examples = sorted(self.bad)[:5]
            raise DataQualityError(
                f"{len(self.bad)} unreadable samples {base} exceed the allowed "
                f"{self.max_fraction:.1%} (max_bad_fraction); first ones: {examples}. "
                "Fix or remove the broken files, or raise max_bad_fraction."
            )

    def state_dict(self) -> dict:
        return {"bad": sorted(self.bad), "reads": self.reads}

    def load_state_dict(self, state: dict) -> None:
        self.bad = set(state.get("bad", []))
        self.reads = int(state.get("reads", 0))
