"""Loss logs (CSV, optional TensorBoard) and the progress bar."""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any

from nextstep.io import atomic_write_text

LOG_COLUMNS = ("step", "epoch", "loss", "text_loss", "image_loss", "learning_rate", "grad_norm",
               "tokens_per_second", "elapsed_seconds")


class CSVLog:
    """Appends one row per logged step to ``path``.

    Rows past ``resume_step`` (written after the checkpoint a run resumes from)
    are dropped when the log is opened, so the file tells one consistent story,
    and so is a row a crash cut short.

    Args:
        path: the CSV file.
        columns: column names; extra metric names are appended in order of appearance.
        resume_step: keep only rows with ``step <= resume_step`` (None keeps all).
    """

    def __init__(self, path: str | Path, columns: tuple[str, ...] = LOG_COLUMNS, resume_step: int | None = None):
        self.path = Path(path)
        self.columns = list(columns)
        if self.path.is_file():
            text = self.path.read_text()
            if text and not text.endswith("\n"):  # a row cut short by a crash
                text = text[:text.rfind("\n") + 1]
            reader = csv.DictReader(io.StringIO(text, newline=""))
            rows = [row for row in reader if None not in row.values() and None not in row]
            if reader.fieldnames:
                self.columns = list(reader.fieldnames)
            if resume_step is not None:
                rows = [r for r in rows if r.get("step") and int(r["step"]) <= resume_step]
            self._rewrite(rows)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._rewrite([])

    def _rewrite(self, rows: list[dict]) -> None:
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(self.columns)
        for row in rows:
            writer.writerow([row.get(c, "") for c in self.columns])
        atomic_write_text(self.path, text.getvalue())

    def write(self, row: dict[str, Any]) -> None:
        new = [k for k in row if k not in self.columns]
        if new:
            # A new metric: rewrite the file with the wider header.
            with open(self.path, newline="") as handle:
                rows = list(csv.DictReader(handle))
            self.columns.extend(new)
            self._rewrite(rows)
        with open(self.path, "a", newline="") as handle:
            csv.writer(handle, lineterminator="\n").writerow([_format(row.get(c, "")) for c in self.columns])


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.8g}"
    return str(value)


def read_log(path: str | Path) -> list[dict[str, float]]:
    """Rows of a CSV log as numbers."""
    with open(path, newline="") as handle:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(handle)]


class TensorBoardLog:
    """Scalars to TensorBoard event files (needs the ``tensorboard`` package)."""

    def __init__(self, directory: str | Path, purge_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError(
                "tensorboard logging needs the 'tensorboard' package: pip install tensorboard "
                "(or set tensorboard to false)"
            ) from None
        self.writer = SummaryWriter(str(directory), purge_step=purge_step)

    def write(self, row: dict[str, Any]) -> None:
        step = int(row["step"])
        for name, value in row.items():
            if name != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(f"train/{name}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Progress:
    """A tqdm bar over optimiser steps showing loss, throughput and (tqdm's) ETA.

    Args:
        total: steps of the run.
        initial: steps already done (resume).
        enabled: False shows nothing (other ranks, quiet runs).
    """

    def __init__(self, total: int, initial: int = 0, enabled: bool = True):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
                        smoothing=0.1)
        self.started = time.perf_counter()

    def update(self, loss: float, tokens_per_second: float) -> None:
        self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_second:,.0f}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
