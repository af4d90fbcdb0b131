"""Choose a model's guidance settings on prompts training has seen.

Runs the shapes GenEval on the *seen* combinations (never the held-out ones)
and caption-to-image retrieval on emoji the model trained on
(`SeenEmojiRetrieval`, never the held-out emoji) for every guidance scale,
schedule and number of candidates (best of K, `nextstep.reranking`) of the
grid. The chosen setting has the highest mean of the shapes score and the
emoji R@10 ratio (generated / real); with ``--emoji-count 0``,
the highest shapes score. Then it scores the held-out shapes prompts with the
chosen setting and with the evaluation's default (CFG 3, constant), so the
choice never looks at the prompts it is judged on.

Usage:
    python benchmarks/guidance_sweep.py [--model emoji-shapes-64] [--images-per-tag 100]
        [--scales 1,1.5,2,3,4,5,7.5] [--schedules constant,linear_increasing] [--candidates 1]
        [--emoji-count 400] [--out DIR]

Writes guidance_sweep_<model>.json and .md into --out (default benchmarks/results).
The chosen setting is what the model's ``config.json`` should carry in its
``generation`` block.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine  # noqa: E402


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="emoji-shapes-64")
    parser.add_argument("--images-per-tag", type=int, default=100)
    parser.add_argument("--scales", type=_floats, default=[1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.5])
    parser.add_argument("--schedules", default="constant,linear_increasing")
    parser.add_argument("--candidates", type=_ints, default=[1],
                        help="numbers of candidates per image to try (best of K)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--emoji-count", type=int, default=400,
                        help="training emoji scored by retrieval for each setting (0: shapes only)")
    parser.add_argument("--emoji-fit-count", type=int, default=0,
                        help="training emoji the retrieval map is fitted on (0: all the others)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and Markdown files")
    args = parser.parse_args(argv)

    from nextstep import load_model
    from nextstep.evaluation.sampling import SamplingSettings
    from nextstep.evaluation.shapes_geneval import run_shapes_geneval
    from nextstep.io import atomic_write_text

    model = load_model(args.model).eval()
    emoji = None
    if args.emoji_count:
        from nextstep.evaluation.emoji_eval import SeenEmojiRetrieval

        emoji = SeenEmojiRetrieval(size=args.size, count=args.emoji_count, fit_count=args.emoji_fit_count)
    schedules = [s for s in args.schedules.split(",") if s]
    grid = [(scale, schedule, candidates) for scale in args.scales for schedule in schedules
            for candidates in args.candidates
            if scale != 1.0 or schedule == schedules[0]]  # every schedule is the same at scale 1

    def score(scale: float, schedule: str, candidates: int, combinations: str) -> dict:
        settings = SamplingSettings(height=args.size, width=args.size, cfg=scale, cfg_schedule=schedule,
                                    num_steps=args.steps, batch_size=args.batch_size, candidates=candidates)
        start = time.perf_counter()
        report = run_shapes_geneval(model, images_per_tag=args.images_per_tag, settings=settings,
                                    with_ceiling=False, combinations=combinations)
        row = {"cfg": scale, "cfg_schedule": schedule, "candidates": candidates, "combinations": combinations,
               "overall": report.overall, "per_tag": report.per_tag, "empty": report.empty}
        if emoji is not None and combinations == "seen":
            row["emoji"] = emoji(model, settings)
            row["score"] = (report.overall + row["emoji"]["ratio"]) / 2
        row["seconds"] = round(time.perf_counter() - start, 1)
        print(f"{combinations:>8}  cfg {scale:<4} {schedule:<18} K {candidates:<2} overall {report.overall:.3f}  "
              + " ".join(f"{tag} {value:.2f}" for tag, value in report.per_tag.items())
              + f"  empty single_object {report.empty['single_object']:.2f}"
              + (f"  emoji R@10 {row['emoji']['R@10']:.3f} ratio {row['emoji']['ratio']:.2f}" if "emoji" in row
                 else ""), flush=True)
        return row

    seen = [score(scale, schedule, candidates, "seen") for scale, schedule, candidates in grid]
    best = max(seen, key=lambda row: row.get("score", row["overall"]))
    chosen = {"cfg": best["cfg"], "cfg_schedule": best["cfg_schedule"], "candidates": best["candidates"]}
    held_out = [score(chosen["cfg"], chosen["cfg_schedule"], chosen["candidates"], "held_out")]
    if tuple(chosen.values()) != (3.0, "constant", 1):
        held_out.append(score(3.0, "constant", 1, "held_out"))

    name = f"guidance_sweep_{Path(args.model).name.replace('-', '_')}"
    payload = {"model": args.model, "images_per_tag": args.images_per_tag, "num_steps": args.steps,
               "emoji_count": args.emoji_count,
               "emoji_real": emoji.real if emoji is not None else None, "seen": seen,
               "chosen": chosen,
               "held_out": held_out}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{name}.json"
    atomic_write_text(path, json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    tags = list(seen[0]["per_tag"])
    emoji_header = emoji_rule = ""
    if emoji is not None:
        emoji_header = " emoji R@10 | emoji ratio | score |"
        emoji_rule = "---|---|---|"
    lines = [f"Shapes GenEval of {args.model}, {args.images_per_tag} images per category, "
             f"{args.steps} head steps."
             + (f" Emoji: retrieval on {args.emoji_count} training emoji (real R@10 {emoji.real['R@10']:.3f}); "
                "score: mean of the shapes overall and the emoji ratio." if emoji is not None else ""), "",
             "| prompts | cfg | schedule | candidates | overall | " + " | ".join(tags) + " | empty single_object |"
             + emoji_header,
             "|---|---|---|---|---|" + "---|" * (len(tags) + 1) + emoji_rule]
    for row in seen + held_out:
        cells = ""
        if emoji is not None:
            cells = (f" {row['emoji']['R@10']:.3f} | {row['emoji']['ratio']:.2f} | {row['score']:.3f} |"
                     if "emoji" in row else " | | |")
        lines.append(f"| {row['combinations']} | {row['cfg']:g} | {row['cfg_schedule']} | {row['candidates']} | "
                     f"{row['overall']:.3f} | "
                     + " | ".join(f"{row['per_tag'][t]:.2f}" for t in tags)
                     + f" | {row['empty']['single_object']:.2f} |" + cells)
    atomic_write_text(args.out / f"{name}.md", "\n".join(lines) + "\n")
    print(f"chosen on seen prompts: cfg {best['cfg']:g}, {best['cfg_schedule']}, {best['candidates']} "
          f"candidate(s); wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
