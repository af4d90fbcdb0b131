"""Per-image latency of text-to-image generation on the CPU, with a breakdown.

The configuration is a small model whose shapes are fixed here: a Qwen2 backbone
with hidden size 256, 4 layers, 4 query / 2 key-value heads (MLP 1024), a
3 x 256 flow-matching head, the ``tiny`` VAE, 256x256 images (16x16 = 256
tokens), 20 Euler head steps per token, CFG 7.5 (two branches). Each batch size
is run once to warm up and then ``--repeats`` times; the fastest run is reported,
with the median beside it.

Each batch size runs with 1 PyTorch thread and with PyTorch's default (the
machine's cores). Wall time is what the targets are about. The process CPU time
is printed beside it: with one thread on a machine that other work keeps busy,
it is the better estimate of the wall time on an idle one.

The breakdown comes from the same runs: time inside the backbone's forward
(prefill and the cached one-token steps), inside the head's sampling (the
per-token ``prepare`` of the image head plus the sampler's loop), the VAE decode,
and the rest of the loop (projectors, bookkeeping).

Usage:
    python benchmarks/generation_latency.py                    # batch 1 and 4, 256x256
    python benchmarks/generation_latency.py --threads 1 --repeats 5
    python benchmarks/generation_latency.py --size 64 --batch-sizes 1   # a quick look

Writes benchmarks/results/generation_latency.json (or --output).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine  # noqa: E402

from nextstep import build_model, model_preset  # noqa: E402
from nextstep.backbones import Qwen2BackboneConfig  # noqa: E402
from nextstep.config import ComponentSpec  # noqa: E402
from nextstep.generation import decode_tokens, generate_tokens  # noqa: E402
from nextstep.heads import FlowMatchingHeadConfig  # noqa: E402
from nextstep.io import atomic_write_text  # noqa: E402
from nextstep.samplers import EulerSampler  # noqa: E402

TARGETS_SECONDS_PER_IMAGE = {1: 2.5, 4: 1.5}


def benchmark_model():
    """The benchmark's model: tiny VAE and byte tokenizer, 256-wide backbone and head."""
    preset = model_preset("tiny")()
    backbone = Qwen2BackboneConfig(
        vocab_size=preset.backbone.config.vocab_size, hidden_size=256, intermediate_size=1024,
        num_layers=4, num_heads=4, num_kv_heads=2, rope_theta=10000.0, rms_norm_eps=1e-6,
    )
    head = FlowMatchingHeadConfig(token_dim=64, condition_dim=256, width=256, depth=3)
    config = preset.replace(backbone=ComponentSpec("backbone", "qwen2", backbone),
                            image_head=ComponentSpec("image_head", "flow_matching", head))
    return build_model(config, seed=0).eval()


class Stopwatch:
    """Accumulates wall time per named part."""

    def __init__(self):
        self.seconds = defaultdict(float)

    def wrap(self, name, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start

        return timed


class TimedSampler(EulerSampler):
    """Euler, with its `sample` calls timed."""

    def __init__(self, stopwatch: Stopwatch):
        super().__init__()
        self.stopwatch = stopwatch

    def sample(self, *args, **kwargs):
        return self.stopwatch.wrap("head", super().sample)(*args, **kwargs)


def run_once(model, batch, size, steps, cfg):
    """One generation + decode; returns the seconds of each part and in total."""
    stopwatch = Stopwatch()
    backbone_forward, head_prepare = model.backbone.forward, model.image_head.prepare
    model.backbone.forward = stopwatch.wrap("backbone", backbone_forward)
    model.image_head.prepare = stopwatch.wrap("head", head_prepare)
    try:
        cpu_start = time.process_time()
        start = time.perf_counter()
        tokens, grid_h, grid_w = generate_tokens(
            model, ["a red circle to the left of a blue square"] * batch, height=size, width=size,
            cfg=cfg, num_steps=steps, sampler=TimedSampler(stopwatch), seed=0,
        )
        generated = time.perf_counter()
        decode_tokens(model, tokens, grid_h, grid_w)
        end = time.perf_counter()
        cpu_seconds = time.process_time() - cpu_start
    finally:
        del model.backbone.forward, model.image_head.prepare
    parts = dict(stopwatch.seconds)
    parts["vae_decode"] = end - generated
    parts["other"] = (generated - start) - parts["backbone"] - parts["head"]
    parts["total"] = end - start
    parts["cpu"] = cpu_seconds
    return parts, grid_h * grid_w


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="1,4", help="comma-separated images per call")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (multiple of 16)")
    parser.add_argument("--steps", type=int, default=20, help="head steps per token")
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", default=f"1,{torch.get_num_threads()}",
                        help="comma-separated torch intra-op thread counts to run (default: 1 and torch's choice)")
    parser.add_argument("--output", default=None, help="result file (default benchmarks/results/...)")
    args = parser.parse_args()
    model = benchmark_model()
    counts = model.parameter_counts()
    rows = []
    thread_counts = sorted({int(t) for t in args.threads.split(",")})
    for threads, batch in ((t, int(b)) for t in thread_counts for b in args.batch_sizes.split(",")):
        torch.set_num_threads(threads)
        start = time.perf_counter()
        run_once(model, batch, args.size, args.steps, args.cfg)  # warm-up
        warmup_seconds = time.perf_counter() - start
        runs = [run_once(model, batch, args.size, args.steps, args.cfg)[0] for _ in range(args.repeats)]
        tokens = (args.size // 16) ** 2
        best = min(runs, key=lambda r: r["total"])
        row = {
            "threads": threads,
            "batch": batch,
            "warmup_seconds": round(warmup_seconds, 2),
            "seconds_per_image": round(best["total"] / batch, 4),
            "seconds_per_image_median": round(statistics.median(r["total"] for r in runs) / batch, 4),
            "seconds_per_call": round(best["total"], 4),
            "cpu_seconds_per_image": round(min(r["cpu"] for r in runs) / batch, 4),
            "breakdown_seconds_per_image": {k: round(v / batch, 4) for k, v in best.items()
                                            if k not in ("total", "cpu")},
            "backbone_ms_per_token_step": round(1000 * best["backbone"] / tokens, 3),
            "head_ms_per_token": round(1000 * best["head"] / tokens, 3),
            "target_seconds_per_image": TARGETS_SECONDS_PER_IMAGE.get(batch),
        }
        rows.append(row)
        parts = ", ".join(f"{k} {v:.3f}" for k, v in row["breakdown_seconds_per_image"].items())
        print(f"{threads} thread(s), batch {batch}: {row['seconds_per_image']:.3f} s/image "
              f"(median {row['seconds_per_image_median']:.3f}, CPU time {row['cpu_seconds_per_image']:.3f}; "
              f"target {row['target_seconds_per_image']}) | "
              f"per image: {parts} | backbone {row['backbone_ms_per_token_step']:.2f} ms/token, "
              f"head {row['head_ms_per_token']:.2f} ms/token", flush=True)
    payload = {
        "machine": machine(),
        "load_average": os.getloadavg(),
        "config": {
            "size": args.size, "tokens": (args.size // 16) ** 2, "head_steps": args.steps, "cfg": args.cfg,
            "sampler": "euler", "backbone": "qwen2 hidden 256, 4 layers, 4 heads / 2 KV heads, MLP 1024",
            "head": "flow_matching 3 x 256", "vae": "tiny", "repeats": args.repeats,
            "parameters": counts,
        },
        "results": rows,
    }
    path = Path(args.output) if args.output else RESULTS / "generation_latency.json"
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
