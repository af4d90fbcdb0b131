"""Peak memory of loading a sharded NextStep-1 release checkpoint, against model size + largest shard.

A synthetic release directory (the published layout: Llama-style ``config.json``,
``model-0000k-of-0000n.safetensors`` shards with an index, tokenizer files,
``vae/``) of at least 1 GB is written to a temporary directory, shard by shard.
A fresh Python process then imports the library, resets its peak-RSS counter
(``/proc/self/clear_refs``), loads the directory with
``NextStep.from_pretrained`` and reports:

* ``baseline_rss``: resident memory after the imports, before loading;
* ``peak_rss``: the peak resident memory while loading (``VmHWM``);
* ``model_bytes``: bytes of every parameter and buffer of the loaded model;
* ``largest_shard_bytes``: size of the largest shard file;
* ``ratio`` = (peak_rss - baseline_rss) / (model_bytes + largest_shard_bytes),
  the target being below 1.3; ``ratio_including_baseline`` uses peak_rss itself.

The same is measured for this library's own single-file layout when ``--native``
is given (the directory is converted first).

Usage:
    python benchmarks/load_memory.py                       # ~1.9 GB bf16 checkpoint, 6 shards
    python benchmarks/load_memory.py --layers 6 --native   # smaller, plus the native layout

Writes benchmarks/results/load_memory.json (or --output). The temporary
checkpoint is deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
from common import write_results  # noqa: E402
from interop_synthetic import (  # noqa: E402
    ReleaseShapes,
    random_tensor,
    release_config,
    release_tensor_shapes,
    write_tokenizer,
    write_vae,
)

MEASURE = r"""
import json, sys, time
from pathlib import Path
import torch
from nextstep.model import NextStep

def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)

dtype = {"none": None, "bfloat16": torch.bfloat16, "float32": torch.float32}[sys.argv[2]]
Path("/proc/self/clear_refs").write_text("5")
baseline = status("VmRSS")
start = time.perf_counter()
model = NextStep.from_pretrained(sys.argv[1], dtype=dtype)
seconds = time.perf_counter() - start
peak = status("VmHWM")
tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
model_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
print("\nRESULT " + json.dumps({"baseline_rss": baseline, "peak_rss": peak, "model_bytes": model_bytes,
                  "load_seconds": seconds, "rss_after": status("VmRSS")}))
"""


def write_synthetic_release(directory: Path, shapes: ReleaseShapes, dtype: torch.dtype, max_shard_size: int) -> None:
    """The release layout, written one shard at a time (the writer never holds the whole model)."""
    directory.mkdir(parents=True)
    ids = write_tokenizer(directory, vocabulary="small")
    generator = torch.Generator().manual_seed(0)
    names = release_tensor_shapes(shapes, gen_pos_embed=False)
    itemsize = torch.empty((), dtype=dtype).element_size()
    groups, used = [[]], 0
    for name, shape in names.items():
        size = itemsize * int(torch.tensor(shape).prod())
        if groups[-1] and used + size > max_shard_size:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    weight_map, total = {}, 0
    for index, group in enumerate(groups, start=1):
        file = f"model-{index:05d}-of-{len(groups):05d}.safetensors"
        shard = {name: random_tensor(name, names[name], generator).to(dtype) for name in group}
        total += sum(t.numel() * t.element_size() for t in shard.values())
        save_file(shard, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, file))
        del shard
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (directory / "config.json").write_text(json.dumps(release_config(shapes, ids), indent=2))
    write_vae(directory / "vae", shapes, generator)


def measure(directory: Path, dtype: str) -> dict:
    """Load ``directory`` in a fresh process and return its memory report."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", MEASURE, str(directory), dtype], capture_output=True,
                            text=True, env=env, stdin=subprocess.DEVNULL, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"loading {directory} failed:\n{result.stderr[-4000:]}")
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"no result from the loading process:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def summarise(report: dict, largest_shard: int, layout: str) -> dict:
    reference = report["model_bytes"] + largest_shard
    row = {"layout": layout, **report, "largest_shard_bytes": largest_shard,
           "ratio": (report["peak_rss"] - report["baseline_rss"]) / reference,
           "ratio_including_baseline": report["peak_rss"] / reference}
    print(f"{layout:8s} model {report['model_bytes'] / 1e9:.3f} GB, largest shard {largest_shard / 1e9:.3f} GB, "
          f"baseline {report['baseline_rss'] / 1e9:.3f} GB, peak {report['peak_rss'] / 1e9:.3f} GB, "
          f"ratio {row['ratio']:.3f} (with baseline {row['ratio_including_baseline']:.3f}), "
          f"load {report['load_seconds']:.1f} s")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--max-shard-mb", type=int, default=400)
    parser.add_argument("--native", action="store_true", help="also measure the library's own layout")
    parser.add_argument("--output", default="load_memory",
                        help="a name under benchmarks/results/ (.json added), or a file path")
    args = parser.parse_args()

    shapes = ReleaseShapes(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                           num_layers=args.layers, num_heads=args.hidden // 128,
                           num_kv_heads=max(1, args.hidden // 512),
                           fm_head_dim=1536, fm_head_layers=12, latent_channels=16)
    dtype = getattr(torch, args.dtype)
    scratch = Path(tempfile.mkdtemp(prefix="nextstep-load-memory-"))
    rows = []
    try:
        release = scratch / "release"
        start = time.perf_counter()
        write_synthetic_release(release, shapes, dtype, args.max_shard_mb * 10**6)
        shards = sorted(release.glob("model-*.safetensors"))
        checkpoint_bytes = sum(p.stat().st_size for p in shards)
        largest = max(p.stat().st_size for p in shards)
        print(f"wrote {len(shards)} shards, {checkpoint_bytes / 1e9:.3f} GB, in {time.perf_counter() - start:.1f} s")
        if checkpoint_bytes < 10**9:
            print("note: the checkpoint is below 1 GB; the target is defined for >= 1 GB")
        rows.append(summarise(measure(release, "none"), largest, "release"))
        if args.native:
            from nextstep.model import NextStep

            NextStep.from_pretrained(release).save_pretrained(scratch / "native")
            single = (scratch / "native" / "model.safetensors").stat().st_size
            rows.append(summarise(measure(scratch / "native", "none"), single, "native"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    path = write_results(args.output, {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "shapes": {"hidden": args.hidden, "intermediate": args.intermediate, "layers": args.layers,
                   "vocab": args.vocab, "dtype": args.dtype, "max_shard_mb": args.max_shard_mb},
        "checkpoint_bytes": checkpoint_bytes, "num_shards": len(shards),
        "target": "ratio = (peak_rss - baseline_rss) / (model_bytes + largest_shard_bytes) < 1.3",
        "rows": rows,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
