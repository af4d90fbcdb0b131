"""JSONL manifests: one JSON object per line, read with errors that name the file and the line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator


def manifest_entries(manifest: Path, required: tuple[str, ...] = ()) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-empty line of ``manifest``.

    Args:
        manifest: the JSONL file.
        required: keys every object must have with a string value.

    Raises:
        ValueError: a line that is not a JSON object, or lacks a required string,
            naming the file, the line and what it expected.
    """
    for number, line in enumerate(manifest.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{manifest} line {number} is not valid JSON: {error}") from None
        if not isinstance(entry, dict):
            raise ValueError(f"{manifest} line {number}: expected a JSON object, found {line!r}")
        missing = [key for key in required if not isinstance(entry.get(key), str)]
        if missing:
            raise ValueError(f"{manifest} line {number}: missing or non-string {missing} in {line!r}")
        yield number, entry
