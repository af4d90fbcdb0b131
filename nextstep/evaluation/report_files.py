"""The files every evaluation suite writes: ``report.json``, ``report.md`` and, per item, ``results.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nextstep.io import atomic_write_text


def write_report_files(output: str | Path, report: Any, results: list[dict] | None = None) -> Path:
    """Write ``report`` (an object with ``to_dict`` and ``to_markdown``) into the folder ``output``.

    Creates the folder, then atomically writes ``report.json``, ``report.md``
    and, when ``results`` are given, ``results.jsonl`` (one JSON object per line).

    Returns:
        the folder, as a `Path`.
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    if results is not None:
        atomic_write_text(output / "results.jsonl", "".join(json.dumps(result) + "\n" for result in results))
    atomic_write_text(output / "report.json", json.dumps(report.to_dict(), indent=2) + "\n")
    atomic_write_text(output / "report.md", report.to_markdown() + "\n")
    return output
