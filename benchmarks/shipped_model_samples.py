"""The sample grid of the documentation: the shipped model on fixed prompts and seeds.

Rows are prompts (held-out shapes prompts, training emoji names, held-out emoji
names), columns are seeds 0..7; settings are the model's own (its config's
``generation`` block) unless given. Writes docs/images/shipped_samples.png and
benchmarks/results/shipped_model_samples.json (the prompts, in row order).

Usage:
    python benchmarks/shipped_model_samples.py [--cfg S] [--cfg-schedule NAME] [--steps N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

PROMPTS = [
    ("held-out shapes", "a circle and a triangle"),
    ("held-out shapes", "three squares"),
    ("held-out shapes", "a red circle"),
    ("held-out shapes", "a circle to the left of a square"),
    ("held-out shapes", "a blue circle and an orange square"),
    ("training emoji", "grinning face with smiling eyes"),
    ("training emoji", "red heart"),
    ("held-out emoji", "upside-down face"),
    ("held-out emoji", "purple heart"),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", type=float, default=None, help="default: the model's")
    parser.add_argument("--cfg-schedule", default=None, help="default: the model's")
    parser.add_argument("--steps", type=int, default=None, help="default: the model's")
    parser.add_argument("--output", default=str(Path(__file__).resolve().parents[1] / "docs" / "images"
                                                / "shipped_samples.png"))
    parser.add_argument("--results", default="shipped_model_samples", help="results name or path (common.results_path)")
    args = parser.parse_args()

    from nextstep import load_model
    from nextstep.images import image_grid
    from nextstep.io import atomic_path

    model = load_model("emoji-shapes-64").eval()
    chosen = model.config.generation.overridden(cfg=args.cfg, cfg_schedule=args.cfg_schedule, num_steps=args.steps)
    images = []
    with torch.no_grad():
        for _, prompt in PROMPTS:
            images += model.generate(prompt, height=64, width=64, cfg=chosen.cfg, cfg_schedule=chosen.cfg_schedule,
                                     num_steps=chosen.num_steps, seed=0, num_images_per_prompt=8)
    grid = image_grid(images, columns=8)
    with atomic_path(args.output) as tmp:
        grid.save(tmp, format="PNG")
    path = write_results(args.results, {"cfg": chosen.cfg, "cfg_schedule": chosen.cfg_schedule,
                                                   "steps": chosen.num_steps,
                                                   "seeds": list(range(8)),
                                                   "rows": [{"kind": k, "prompt": p} for k, p in PROMPTS]})
    print(f"wrote {args.output} and {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
