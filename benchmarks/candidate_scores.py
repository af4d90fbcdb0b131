"""How well each best-of-K candidate score tells matching image-caption pairs apart.

A candidate score (`nextstep.reranking.CANDIDATE_SCORES`) ranks a prompt's
candidates, so what it must do is rank the prompt's own image above others.
This script takes ``--count`` real held-out emoji (evenly spaced through the
test split, so images the model never trained on), encodes them with the
model's tokenizer, scores every (image, caption) pair with each score and
reports, for each caption, how often its own image ranks first among the
``--count`` images (chance: 1 / count), and the time each score took.

Usage:
    python benchmarks/candidate_scores.py [--model emoji-shapes-64] [--count 48]

Writes benchmarks/results/candidate_scores.json (or --output). Needs the emoji data (`make data`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="emoji-shapes-64")
    parser.add_argument("--count", type=int, default=48, help="held-out emoji (each scored against every caption)")
    parser.add_argument("--output", default="candidate_scores", help="results name or path (common.results_path)")
    args = parser.parse_args()

    from nextstep import load_model
    from nextstep.images import from_pil
    from nextstep.reranking import CANDIDATE_SCORES
    from nextstep.training.data.emoji import EmojiConfig, EmojiDataset

    model = load_model(args.model).eval()
    size = model.config.generation.height
    held_out = EmojiDataset(EmojiConfig(split="test", size=size))
    if not 2 <= args.count <= len(held_out):
        raise SystemExit(f"--count must be in [2, {len(held_out)}], found {args.count}")
    samples = [held_out.load(index * len(held_out) // args.count) for index in range(args.count)]
    with torch.no_grad():
        tokens, grid_h, grid_w = model.encode_images(from_pil([sample.image for sample in samples]))
    captions = [sample.caption for sample in samples]
    count = len(captions)
    # Row i * count + j pairs image i with caption j.
    pair_prompts = [captions[j] for _ in range(count) for j in range(count)]
    pair_tokens = tokens.repeat_interleave(count, dim=0)
    results = {"model": args.model, "count": count, "chance": 1 / count, "scores": {}}
    for name, score in CANDIDATE_SCORES.items():
        start = time.perf_counter()
        with torch.no_grad():
            table = score(model, pair_prompts, pair_tokens, grid_h, grid_w).view(count, count)  # (image, caption)
        seconds = time.perf_counter() - start
        own_image_first = float((table.argmax(dim=0) == torch.arange(count)).float().mean())
        results["scores"][name] = {"own_image_ranked_first": own_image_first, "seconds": seconds,
                                   "pairs": count * count}
        print(f"{name}: a caption's own image ranks first among {count} for {own_image_first:.2f} of captions "
              f"(chance {1 / count:.2f}); {count * count} pairs in {seconds:.1f} s")
    path = write_results(args.output, results)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
