"""The files every evaluation suite writes: ``report.json``, ``report.md`` and, per item, ``results.jsonl``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from nextstep.io import atomic_write_text


def strict_json_data(value: Any) -> Any:
    """``value`` with every NaN or infinite float, at any depth of dicts, lists and tuples, replaced by
    None (JSON ``null``: an undefined value, such as a ratio to zero or the PSNR of identical images),
    and tuples made lists, so that it dumps as strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: strict_json_data(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json_data(item) for item in value]
    return value


def dumps_strict(value: Any, **options: Any) -> str:
    """``json.dumps`` of `strict_json_data` of ``value`` with ``allow_nan=False``: never a ``NaN`` or
    ``Infinity`` token, which strict JSON parsers refuse."""
    return json.dumps(strict_json_data(value), allow_nan=False, **options)


def write_report_files(output: str | Path, report: Any, results: list[dict] | None = None) -> Path:
    """Write ``report`` (an object with ``to_dict`` and ``to_markdown``) into the folder ``output``.

    Creates the folder, then atomically writes ``report.json``, ``report.md``
    and, when ``results`` are given, ``results.jsonl`` (one JSON object per line).
    The JSON files are strict JSON: an undefined number (NaN or infinite) is
    written as ``null`` (`strict_json_data`); ``report.md`` shows it as it is.

    Returns:
        the folder, as a `Path`.
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    if results is not None:
        atomic_write_text(output / "results.jsonl", "".join(dumps_strict(result) + "\n" for result in results))
    atomic_write_text(output / "report.json", dumps_strict(report.to_dict(), indent=2) + "\n")
    atomic_write_text(output / "report.md", report.to_markdown() + "\n")
    return output
