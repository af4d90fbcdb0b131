"""Training throughput of a preset (the tiny model by default) on this CPU, against the CPU's own fp32 matmul rate.

Two numbers per data mode:

- tokens per second: sequence positions (text + image) trained per second, from
  the median step time (the overall mean is reported too);
- matmul-rate fraction: the floating-point operations one optimiser step
  executes (counted with ``torch.utils.flop_counter.FlopCounterMode`` over the
  forward and backward pass) per second, divided by the best fp32 matmul rate
  measured on square matrices in the same process and thread count (before and
  after the training runs; the best counts, since other work on a shared
  machine only lowers it).

Data modes: ``cached`` reads image tokens from a latent cache (the tiny
recipe's setting; the frozen VAE never runs), ``packed`` is ``cached`` with
the sequences of each micro-batch packed into rows of ``--pack-length`` tokens
(``TrainConfig.pack_length``: the same losses without the padding), and
``images`` encodes rendered images with the VAE in every step. Each mode also
reports the share of the positions it runs that are padding.

Usage:
    python benchmarks/train_throughput.py                # about a minute on 2 cores
    python benchmarks/train_throughput.py --steps 50 --micro-batch 64 --modes cached,packed

Writes benchmarks/results/train_throughput.json (or --output).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

from nextstep import build_model  # noqa: E402
from nextstep.training import TextToImageTask, TrainConfig, Trainer, TrainingData, build_latent_cache  # noqa: E402
from nextstep.training.data import (  # noqa: E402
    AspectRatioBuckets,
    LatentCacheDataset,
    ShapesConfig,
    ShapesDataset,
)
from nextstep.training.data.latent_cache import LatentCacheConfig  # noqa: E402


def matmul_rate(sizes=(256, 512, 1024, 1536, 2048), repeats: int = 5) -> dict:
    """Best fp32 GFLOP/s of ``a @ b`` for square matrices of each size."""
    rates = {}
    for size in sizes:
        a, b = torch.randn(size, size), torch.randn(size, size)
        for _ in range(3):
            a @ b
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
        rates[size] = 2 * size**3 / best / 1e9
    return {"gflops_by_size": rates, "best_gflops": max(rates.values())}


def step_flops(trainer: Trainer, batches) -> float:
    """Floating-point operations of one optimiser step (forward + backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        trainer.train_step(batches)
    return float(counter.get_total_flops())


def padding_share(trainer: Trainer, data: TrainingData, config: TrainConfig, count: int = 8) -> float:
    """Share of the positions of ``count`` micro-batches' sequence batches that are padding."""
    batches = iter(data.open(trainer.layout, seed=config.seed))
    real = total = 0
    for step in range(count):
        sequences = trainer.task.sequences(next(batches), torch.Generator().manual_seed(step))
        real += int(sequences.attention_mask.sum())
        total += sequences.attention_mask.numel()
    return 1 - real / total


def measure(mode: str, preset: str, data: TrainingData, config: TrainConfig, steps: int, warmup: int,
            folder: Path) -> dict:
    trainer = Trainer(TextToImageTask.from_train_config(build_model(preset, seed=0), config), data, config,
                      folder / mode, show_progress=False)
    padding = padding_share(trainer, data, config)
    batches = iter(data.open(trainer.layout, seed=config.seed))
    for _ in range(warmup):
        trainer.train_step(batches)
    flops = step_flops(trainer, batches)
    times, tokens, record = [], 0, None
    for _ in range(steps):
        record = trainer.train_step(batches)
        times.append(record.seconds)
        tokens += record.tokens
    seconds, median = sum(times), statistics.median(times)
    # The median step is the headline: on a shared machine a few steps stall on other work.
    return {
        "steps": steps,
        "median_step_seconds": median,
        "tokens_per_second": tokens / steps / median,
        "images_per_second": config.micro_batch_size / median,
        "tokens_per_second_overall": tokens / seconds,
        "flops_per_step": flops,
        "achieved_gflops": flops / statistics.median(times) / 1e9,
        "last_loss": record.loss if record is not None else None,
        "padding_share": padding,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--modes", default="cached,packed,images")
    parser.add_argument("--pack-length", type=int, default=128, help="row length of the packed mode")
    parser.add_argument("--preset", default="tiny", help="the model preset to train (tiny, compact, ...)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--output", default="train_throughput",
                        help="a name under benchmarks/results/ (.json added), or a file path")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    peak = matmul_rate()
    print(f"fp32 matmul: best {peak['best_gflops']:.1f} GFLOP/s "
          f"({', '.join(f'{k}: {v:.1f}' for k, v in peak['gflops_by_size'].items())})")
    config = TrainConfig(micro_batch_size=args.micro_batch, max_steps=10_000, warmup_steps=10,
                         learning_rate=1e-3, checkpoint_every=10_000)
    buckets = AspectRatioBuckets(args.resolution, multi_aspect=False)
    samples = args.micro_batch * 16
    shapes = ShapesDataset(ShapesConfig(num_samples=samples, size=args.resolution))
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        for mode in args.modes.split(","):
            run_config = config.replace(pack_length=args.pack_length) if mode == "packed" else config
            if mode in ("cached", "packed"):
                if not (folder / "cache").exists():
                    model = build_model(args.preset, seed=0)
                    build_latent_cache(model.image_tokenizer, shapes, buckets, folder / "cache")
                data = TrainingData(LatentCacheDataset(LatentCacheConfig(str(folder / "cache"))), buckets)
            elif mode == "images":
                data = TrainingData(shapes, buckets)
            else:
                raise SystemExit(f"unknown mode {mode!r}; use cached, packed and/or images")
            row = measure(mode, args.preset, data, run_config, args.steps, args.warmup, folder)
            row["matmul_rate_fraction"] = row["achieved_gflops"] / peak["best_gflops"]
            results[mode] = row
            print(f"{mode:>7}: {row['tokens_per_second']:,.0f} tokens/s, {row['images_per_second']:.1f} images/s, "
                  f"{row['achieved_gflops']:.2f} GFLOP/s = {row['matmul_rate_fraction']:.1%} of the matmul rate "
                  f"(median step {row['median_step_seconds'] * 1e3:.1f} ms, padding {row['padding_share']:.1%})")
    # The machine may be shared: measure the reference rate again and keep the best.
    again = matmul_rate()
    if again["best_gflops"] > peak["best_gflops"]:
        peak = again
        for row in results.values():
            row["matmul_rate_fraction"] = row["achieved_gflops"] / peak["best_gflops"]
    print(f"fp32 matmul (best of before and after): {peak['best_gflops']:.1f} GFLOP/s; fractions: "
          + ", ".join(f"{mode} {row['matmul_rate_fraction']:.1%}" for mode, row in results.items()))
    path = write_results(args.output, {
        "model": args.preset,
        "resolution": args.resolution,
        "micro_batch_size": args.micro_batch,
        "pack_length": args.pack_length,
        "matmul": peak,
        "modes": results,
        "command": " ".join(["python", "benchmarks/train_throughput.py", *sys.argv[1:]]),
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
