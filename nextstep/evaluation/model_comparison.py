"""Several models' evaluations side by side: each suite's headline numbers, one row per model."""

from __future__ import annotations

import math
from typing import Any

#: The numbers of each suite's summary that a comparison shows: (column, key in the suite's summary, which way is
#: better). The rest of a suite's results stay in its own ``report.json``.
HEADLINES: dict[str, tuple[tuple[str, str, str], ...]] = {
    "shapes": (("shapes overall", "overall", "higher"),),
    "emoji": (("emoji R@10 ratio", "retrieval_ratio", "higher"), ("emoji Frechet ratio", "frechet_ratio", "lower")),
    "captioning": (("captions seen", "seen", "higher"), ("captions held-out", "held_out", "higher")),
    "tokenizer": (("tokenizer PSNR", "psnr", "higher"), ("tokenizer SSIM", "ssim", "higher")),
}


def headline_numbers(summary: dict[str, Any]) -> dict[str, float | None]:
    """The `HEADLINES` of the suites ``summary`` holds (what `nextstep eval` writes as ``summary.json``), by
    column; an undefined number (written as null, or NaN) is None."""
    numbers: dict[str, float | None] = {}
    for suite, headlines in HEADLINES.items():
        results = summary.get(suite)
        if not isinstance(results, dict):
            continue
        for column, key, _ in headlines:
            value = results.get(key)
            numbers[column] = None if value is None or not math.isfinite(value) else float(value)
    return numbers


def comparison_row(model: str, folder: str, summary: dict[str, Any]) -> dict[str, Any]:
    """One model's row: its name, the folder of its evaluation, its sampling settings and `headline_numbers`."""
    return {"model": model, "folder": folder, "settings": summary.get("settings", {}),
            "headlines": headline_numbers(summary)}


def comparison_markdown(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of `comparison_row` rows: the model, its guidance and steps, and every headline column
    that some row has (in `HEADLINES` order; "-" where a model's folder has no such suite, "n/a" where the number
    is undefined), with a line saying which way each column is better."""
    columns = [(column, better) for headlines in HEADLINES.values() for column, _, better in headlines
               if any(column in row["headlines"] for row in rows)]
    lines = [_table_line(["model", "cfg", "steps", *(column for column, _ in columns)]),
             "|---|---|---|" + "---|" * len(columns)]
    for row in rows:
        settings = row["settings"]
        lines.append(_table_line([row["model"], settings.get("cfg", "-"), settings.get("num_steps", "-"),
                                  *(_cell(row["headlines"], column) for column, _ in columns)]))
    lower = [column for column, better in columns if better == "lower"]
    note = "Higher is better" + (f"; lower is better for {', '.join(lower)}" if lower else "") + "."
    return "\n".join(lines) + f"\n\n{note}\n"


def _table_line(cells: list) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def _cell(numbers: dict[str, float | None], column: str) -> str:
    if column not in numbers:
        return "-"
    value = numbers[column]
    if value is None:
        return "n/a"
    return f"{value:.2f}" if column == "tokenizer PSNR" else f"{value:.3f}"
