"""How guidance moves the statistics of generated image tokens along the sequence.

NextStep-1 traces the grey-patch artefacts of strong guidance to a token-level
distribution shift: the guided prediction ``u + s (c - u)`` magnifies any gap
between the conditional and unconditional predictions, and nothing normalises
one token at a time, so each token's mean and spread can wander from the data's
as an image is generated, more the later the token and the stronger the
guidance. This module measures that on any model: it samples the same prompts
at several guidance scales and compares each token position's statistics with
those of the real images' tokens.

A token's statistics are over its ``D`` features (what ``use_norm``, a
LayerNorm without affine, sets to 0 and 1): its mean, its standard deviation
and the fraction of features beyond `OUTLIER_THRESHOLD`; each is averaged over
the images at every position of the raster order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from nextstep.config import require_count
from nextstep.evaluation.sampling import SamplingSettings, sample_token_batches

if TYPE_CHECKING:
    from PIL import Image

    from nextstep.model import NextStep

#: A feature beyond this many units from 0 counts as an outlier (the latents are normalised to unit variance,
#: so a standard normal feature is beyond 4 with probability 6e-5).
OUTLIER_THRESHOLD = 4.0


@dataclass(frozen=True)
class PositionStatistics:
    """Token statistics by position in the raster order, averaged over images.

    Args:
        mean: (N,) the mean over images of each token's mean over its features.
        std: (N,) the mean over images of each token's standard deviation over its features.
        outliers: (N,) the fraction of the position's features (over images) beyond `OUTLIER_THRESHOLD`.
        images: how many images the averages are over.
    """

    mean: torch.Tensor
    std: torch.Tensor
    outliers: torch.Tensor
    images: int

    @classmethod
    def of(cls, tokens: torch.Tensor) -> "PositionStatistics":
        """The statistics of ``tokens`` (B, N, D), B >= 1 images of N tokens of D >= 2 features."""
        if tokens.ndim != 3 or tokens.shape[0] < 1 or tokens.shape[1] < 1 or tokens.shape[2] < 2:
            raise ValueError(f"tokens must have shape (B, N, D) with B, N >= 1 and D >= 2, found "
                             f"{tuple(tokens.shape)}")
        tokens = tokens.detach().double().cpu()
        return cls(mean=tokens.mean(dim=2).mean(dim=0), std=tokens.std(dim=2, unbiased=False).mean(dim=0),
                   outliers=(tokens.abs() > OUTLIER_THRESHOLD).double().mean(dim=(0, 2)), images=tokens.shape[0])

    @classmethod
    def combined(cls, parts: Sequence["PositionStatistics"]) -> "PositionStatistics":
        """The statistics of the images of all ``parts`` (batches of one token grid) together."""
        if not parts:
            raise ValueError("expected the statistics of at least one batch, found none")
        images = sum(part.images for part in parts)

        def average(name: str) -> torch.Tensor:
            return sum(getattr(part, name) * part.images for part in parts) / images

        return cls(mean=average("mean"), std=average("std"), outliers=average("outliers"), images=images)

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.tolist(), "std": self.std.tolist(), "outliers": self.outliers.tolist(),
                "images": self.images}


def position_groups(tokens: int, parts: int) -> list[range]:
    """``tokens`` positions cut into ``min(parts, tokens)`` consecutive groups whose sizes differ by at most one
    (the earlier groups the larger)."""
    require_count("tokens", tokens)
    require_count("parts", parts)
    parts = min(parts, tokens)
    size, extra = divmod(tokens, parts)
    bounds = [0]
    for index in range(parts):
        bounds.append(bounds[-1] + size + (index < extra))
    return [range(start, stop) for start, stop in zip(bounds, bounds[1:])]


@dataclass(frozen=True)
class GuidanceTokenReport:
    """Token statistics of real images and of generations at several guidance scales.

    Args:
        real: the statistics of the real images' tokens.
        generated: (scale, statistics of the tokens generated at that scale), in the order sampled.
        grid: the token grid (h, w); positions run row by row.
        settings: the sampling settings but the guidance scale (`SamplingSettings.to_dict`).
        use_norm: whether every sampled token was LayerNormed (the model's setting when not given).
        parts: how many groups of consecutive positions the Markdown tables show.
    """

    real: PositionStatistics
    generated: list[tuple[float, PositionStatistics]]
    grid: tuple[int, int]
    settings: dict[str, Any]
    use_norm: bool
    parts: int = 4

    def gaps(self, scale_index: int) -> dict[str, list[float]]:
        """By group of positions, how generation ``scale_index``'s statistics differ from the real ones:
        ``std``, the token spread generated minus real (negative: narrower than the data), and ``mean``, the
        absolute difference of the token means, each averaged over the group's positions."""
        _, statistics = self.generated[scale_index]
        groups = position_groups(self.grid[0] * self.grid[1], self.parts)
        spread = statistics.std - self.real.std
        shift = (statistics.mean - self.real.mean).abs()
        return {"std": [float(spread[list(group)].mean()) for group in groups],
                "mean": [float(shift[list(group)].mean()) for group in groups]}

    def to_dict(self) -> dict[str, Any]:
        return {"grid": list(self.grid), "settings": self.settings, "use_norm": self.use_norm,
                "outlier_threshold": OUTLIER_THRESHOLD, "parts": self.parts, "real": self.real.to_dict(),
                "generated": [{"cfg": scale, **statistics.to_dict(), "gaps": self.gaps(index)}
                              for index, (scale, statistics) in enumerate(self.generated)]}

    def to_markdown(self) -> str:
        tokens = self.grid[0] * self.grid[1]
        groups = position_groups(tokens, self.parts)
        names = [f"tokens {group.start + 1}-{group.stop}" if len(group) > 1 else f"token {group.start + 1}"
                 for group in groups]

        def table(title: str, rows: list[tuple[str, list[float]]], digits: int, signed: bool = False) -> str:
            lines = [f"| {title} | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
            lines += [f"| {label} | " + " | ".join(f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
                                                  for value in values) + " |"
                      for label, values in rows]
            return "\n".join(lines)

        def by_group(values: torch.Tensor) -> list[float]:
            return [float(values[list(group)].mean()) for group in groups]

        def rows(name: str) -> list[tuple[str, list[float]]]:
            return [("real", by_group(getattr(self.real, name)))] + [
                (f"CFG {scale:g}", by_group(getattr(statistics, name))) for scale, statistics in self.generated]

        settings = self.settings
        gaps = [(f"CFG {scale:g}", self.gaps(index)) for index, (scale, _) in enumerate(self.generated)]
        return "\n\n".join([
            f"Image tokens of {self.real.images} real and {self.generated[0][1].images} generated images "
            f"({self.grid[0]}x{self.grid[1]} tokens, raster order; {settings.get('num_steps')} steps, "
            f"schedule {settings.get('cfg_schedule')}, use_norm {self.use_norm}). A token's mean and spread are "
            "over its features, averaged over the images and over the positions of each group.",
            table("token spread (std)", rows("std"), 3),
            table("token mean", rows("mean"), 3),
            table(f"features beyond {OUTLIER_THRESHOLD:g}", rows("outliers"), 4),
            table("spread, generated - real", [(label, gap["std"]) for label, gap in gaps], 3, signed=True),
            table("mean, abs(generated - real)", [(label, gap["mean"]) for label, gap in gaps], 3),
        ]) + "\n"

    def to_csv(self) -> str:
        """One line per position: the real statistics, then each scale's (mean, std, outliers)."""
        header = ["position", "real_mean", "real_std", "real_outliers"]
        for scale, _ in self.generated:
            header += [f"cfg{scale:g}_mean", f"cfg{scale:g}_std", f"cfg{scale:g}_outliers"]
        lines = [",".join(header)]
        for position in range(self.grid[0] * self.grid[1]):
            values = [self.real.mean, self.real.std, self.real.outliers]
            for _, statistics in self.generated:
                values += [statistics.mean, statistics.std, statistics.outliers]
            lines.append(",".join([str(position + 1)] + [f"{float(v[position]):.6g}" for v in values]))
        return "\n".join(lines) + "\n"


def real_token_statistics(model: "NextStep", images: Sequence["Image.Image"], *, batch_size: int = 32,
                          seed: int = 0) -> tuple[PositionStatistics, tuple[int, int]]:
    """The statistics of the tokens the model's image tokenizer makes of ``images`` (PIL images of one size),
    and their grid; a tokenizer that samples its latents draws image ``i``'s from seed ``seed + i``."""
    from nextstep.generation import encode_each
    from nextstep.images import as_image_list

    if not images:
        raise ValueError("expected at least one real image, found none")
    require_count("batch_size", batch_size)
    parts, grid = [], (0, 0)
    model.eval()
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = as_image_list(list(images[start:start + batch_size]))  # one (1, 3, H, W) per image
            encoded = encode_each(model, batch, seeds=range(seed + start, seed + start + len(batch)))
            parts.append(PositionStatistics.of(torch.stack([tokens for tokens, _, _ in encoded])))
            grid = encoded[0][1:]
    return PositionStatistics.combined(parts), grid


def guidance_token_statistics(model: "NextStep", prompts: Sequence[str], real_images: Sequence["Image.Image"], *,
                              scales: Sequence[float], settings: SamplingSettings | None = None,
                              use_norm: bool | None = None, parts: int = 4, output: str | Path | None = None,
                              progress: Callable[[int, int], None] | None = None) -> GuidanceTokenReport:
    """Sample one image's tokens per prompt at each guidance scale and compare their statistics by position
    with those of ``real_images`` (of the settings' size; typically the images the prompts caption).

    Every scale uses the same seeds (image ``i``: ``settings.seed + i``), so the scales differ in guidance
    only. With ``output`` it writes ``report.json``, ``report.md`` and ``positions.csv`` (every position's
    statistics).

    Args:
        model: the model to sample.
        prompts: one prompt per generated image.
        real_images: the reference images.
        scales: the guidance scales (each >= 0; 1 samples the conditional branch alone).
        settings: the sampling settings but the guidance scale (default: the model's own,
            `SamplingSettings.from_defaults`).
        use_norm: LayerNorm each sampled token (None: the model's setting).
        parts: how many groups of consecutive positions the Markdown tables show.
        output: a folder for the report files.
        progress: called with (images done, images in all) as the scales are sampled.

    Raises:
        ValueError: no prompts or scales, a scale that is not a finite number >= 0, or real images of another
            size than the settings', before anything is sampled.
    """
    from nextstep.evaluation.report_files import write_report_files
    from nextstep.io import atomic_write_text

    settings = settings or SamplingSettings.from_defaults(model.config.generation)
    prompts = list(prompts)
    if not prompts:
        raise ValueError("expected at least one prompt, found none")
    scales = [float(scale) for scale in scales]
    if not scales or not all(math.isfinite(scale) and scale >= 0 for scale in scales):
        raise ValueError(f"scales must be one or more finite numbers >= 0, found {scales}")
    require_count("parts", parts)
    sizes = sorted({image.size for image in real_images})
    if sizes and sizes != [(settings.width, settings.height)]:
        raise ValueError(f"real images must be {settings.width}x{settings.height} like the generated ones, found "
                         + ", ".join(f"{w}x{h}" for w, h in sizes))
    real, grid = real_token_statistics(model, real_images, batch_size=settings.batch_size, seed=settings.seed)
    from nextstep.fast.token_sampler import token_sampler_named

    token_sampler = token_sampler_named(model, settings.token_sampler)  # one for every scale
    generated = []
    for index, scale in enumerate(scales):
        def moved(done: int, total: int, index: int = index) -> None:
            if progress is not None:
                progress(index * total + done, len(scales) * total)

        batches = [PositionStatistics.of(tokens) for tokens, _, _ in
                   sample_token_batches(model, prompts, replace(settings, cfg=scale), moved, use_norm=use_norm,
                                        token_sampler=token_sampler)]
        generated.append((scale, PositionStatistics.combined(batches)))
    report = GuidanceTokenReport(
        real=real, generated=generated, grid=grid,
        settings={key: value for key, value in settings.to_dict().items() if key != "cfg"},
        use_norm=model.config.use_norm if use_norm is None else use_norm, parts=parts)
    if output is not None:
        folder = write_report_files(output, report)
        atomic_write_text(folder / "positions.csv", report.to_csv())
    return report
