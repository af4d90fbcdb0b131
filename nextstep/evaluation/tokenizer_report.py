"""The ``nextstep eval-tokenizer`` job: evaluate on held-out photo crops, write JSON, Markdown and a PNG grid."""

from __future__ import annotations

from pathlib import Path

import torch

from nextstep.evaluation.photo_bank import load_photos, random_crops, split_photos
from nextstep.evaluation.report_files import write_report_files
from nextstep.evaluation.tokenizer_eval import ReconstructionReport, evaluate_tokenizer, reconstruct
from nextstep.images import image_grid, to_pil
from nextstep.io import atomic_path
from nextstep.tokenizers.base import ImageTokenizer


def held_out_crops(count: int = 256, size: int = 64, seed: int = 1234) -> torch.Tensor:
    """Fixed-seed crops (count, 3, size, size) from the held-out photos of the photo bank."""
    _, held = split_photos(load_photos())
    return random_crops(held, count, size, seed=seed)


def run_tokenizer_evaluation(tokenizer: ImageTokenizer, output: str | Path, *, count: int = 256, size: int = 64,
                             seed: int = 1234) -> ReconstructionReport:
    """Evaluate ``tokenizer`` on ``count`` held-out crops (count, 3, size, size) and write ``report.json``,
    ``report.md`` and ``reconstructions.png`` into the folder ``output``."""
    tokenizer = tokenizer.eval()
    images = held_out_crops(count, size, seed)
    report = evaluate_tokenizer(tokenizer, images)
    output = write_report_files(output, report)
    shown = images[:8]
    reconstructions, _ = reconstruct(tokenizer, shown)
    grid = image_grid(to_pil(torch.cat([shown, reconstructions])), columns=8)
    with atomic_path(output / "reconstructions.png") as tmp:
        grid.save(tmp, format="PNG")
    return report
