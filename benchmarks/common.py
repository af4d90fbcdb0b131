"""Helpers shared by the benchmark scripts: timing, machine description, result files."""

from __future__ import annotations

import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def best_time(fn, repeats: int = 3, warmup: int = 1) -> float:
    """Fastest wall time of ``repeats`` calls, in seconds, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def interleaved_times(functions: dict, rounds: int = 20, warmup: int = 1) -> dict:
    """Wall times of each of ``functions`` (name -> callable), in seconds, one per round, over ``rounds``
    rounds that call every function once in turn, after ``warmup`` such rounds: a slow spell of a shared
    machine then falls on every function alike, rather than on all the repeats of whichever was running."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, found {rounds}")
    for _ in range(warmup):
        for function in functions.values():
            function()
    times = {name: [] for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return times


def results_path(name: str) -> Path:
    """Where `write_results` writes ``name``: a bare name is ``benchmarks/results/<name>.json``; a path (with a
    folder, or ending in ``.json``) is taken as it is."""
    given = Path(name)
    if given.suffix == ".json" or len(given.parts) > 1:
        return given
    return RESULTS / f"{name}.json"


def write_results(name: str, payload: dict) -> Path:
    """Write `results_path` of ``name`` atomically (with the machine's description) and return its path."""
    from nextstep.io import atomic_write_text

    path = results_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    return path
