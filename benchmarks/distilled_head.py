"""Few-step heads distilled from a model's own sampling, against the model at its own settings.

For each student step count K it records the model's sampling once on
training prompts (the shapes world's seen combinations and the training emoji),
fits one student head per objective to that recording
(`nextstep.training.head_distillation`), then scores on what training never
saw, every row at one draw per image:

* the teacher at its own settings (its guidance, its steps);
* the teacher at K steps with its guidance (fewer steps without distillation);
* each student: K Euler steps, no unconditional branch.

Scores: shapes GenEval on the held-out combinations, the held-out emoji
(retrieval R@10 and Frechet ratios, `nextstep eval`'s emoji suite), and
seconds per image of the tokens on this machine at batch 1 and 8 (every model
timed at the end of the run, in 20 rounds that draw with each model in turn;
the median round), with the head evaluations each token costs. The held-out
emoji's data side (features of every real emoji, the ridge map) is prepared
once for all rows.

Usage:
    python benchmarks/distilled_head.py [--model emoji-shapes-64] [--steps 4,2] [--objectives segments,rollout]
        [--shapes-repeats 16] [--emoji-repeats 1] [--iterations N] [--student-batch-size N] [--images-per-tag 100]
        [--emoji-limit 0] [--size PX] [--save DIR] [--output NAME]

Writes benchmarks/results/distilled_head_<model>.json and .md (or --output).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_times, results_path, write_results  # noqa: E402

LATENCY_PROMPT = "a red circle to the left of a blue square"


def _ints(text: str) -> list[int]:
    return [int(value) for value in text.split(",") if value]


def score(model, settings, images_per_tag: int, emoji) -> dict:
    """Held-out shapes GenEval and, given a prepared `HeldOutEmoji` suite, the held-out emoji."""
    from nextstep.evaluation.shapes_geneval import run_shapes_geneval

    shapes = run_shapes_geneval(model, images_per_tag=images_per_tag, settings=settings, with_ceiling=False)
    row = {"shapes": shapes.overall, "shapes_per_tag": shapes.per_tag}
    if emoji is not None:
        report = emoji(model, settings)
        row.update(emoji_r10_ratio=report.retrieval_ratio, emoji_frechet_ratio=report.frechet_ratio,
                   emoji_count=report.count)
    return row


def latencies(timed: list, rounds: int = 20) -> None:
    """Add the seconds per image of the tokens (prefill, decoding, the head) at batch 1 and 8 to each
    ``(row, model, settings)`` of ``timed``: the median of ``rounds`` rounds that draw with every model
    and batch size in turn (the median, not the fastest: on a shared machine the fastest of a few
    draws of a tenth of a second scatters more than the median does), and the rounds' quartiles."""
    from nextstep.generation import generate_tokens

    draws = {}
    for index, (_, model, settings) in enumerate(timed):
        for batch in (1, 8):
            def draw(model=model, settings=settings, batch=batch):
                with torch.no_grad():
                    generate_tokens(model, [LATENCY_PROMPT] * batch, height=settings.height, width=settings.width,
                                    cfg=settings.cfg, num_steps=settings.num_steps, candidates=1)
            draws[index, batch] = draw
    for (index, batch), seconds in interleaved_times(draws, rounds=rounds).items():
        row = timed[index][0]
        row[f"seconds_per_image_batch{batch}"] = statistics.median(seconds) / batch
        row[f"seconds_per_image_batch{batch}_quartiles"] = [
            value / batch for value in statistics.quantiles(seconds, n=4)] if len(seconds) > 1 else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="emoji-shapes-64")
    parser.add_argument("--steps", type=_ints, default=[4, 2], help="student step counts, each its own student")
    parser.add_argument("--teacher-steps", type=int, default=20)
    parser.add_argument("--shapes-repeats", type=int, default=16, help="teacher images per seen shapes prompt")
    parser.add_argument("--emoji-repeats", type=int, default=1, help="teacher images per training emoji (0: none)")
    parser.add_argument("--objectives", type=lambda text: [value for value in text.split(",") if value],
                        default=["segments", "rollout"], help="student objectives, each its own student")
    parser.add_argument("--iterations", type=int, default=None, help="student iterations (default: the config's)")
    parser.add_argument("--student-batch-size", type=int, default=None,
                        help="token segments per student step (default: the config's)")
    parser.add_argument("--images-per-tag", type=int, default=100)
    parser.add_argument("--emoji-limit", type=int, default=None,
                        help="held-out emoji scored (default all; 0 skips the emoji suite)")
    parser.add_argument("--batch-size", type=int, default=32, help="images generated together when scoring")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
    parser.add_argument("--latency-rounds", type=int, default=20, help="rounds of latency draws (the median counts)")
    parser.add_argument("--save", type=Path, default=None, help="folder to save each distilled model in")
    parser.add_argument("--output", default=None, help="results name or path (default distilled_head_<model>)")
    args = parser.parse_args(argv)

    from nextstep import load_model
    from nextstep.evaluation.emoji_eval import HeldOutEmoji
    from nextstep.evaluation.sampling import SamplingSettings
    from nextstep.io import atomic_write_text
    from nextstep.training.head_distillation import (
        HeadDistillationConfig,
        fit_distilled_head,
        install_distilled_head,
        record_for_distillation,
    )
    from nextstep.training.prompt_sets import prompt_set

    prompts = prompt_set("shapes-seen") * args.shapes_repeats
    if args.emoji_repeats:
        prompts += prompt_set("emoji-train") * args.emoji_repeats
    teacher = load_model(args.model).eval()
    if args.size is not None:
        teacher.config = teacher.config.replace(
            generation=teacher.config.generation.replace(height=args.size, width=args.size))
    defaults = teacher.config.generation
    base = SamplingSettings.from_defaults(defaults, batch_size=args.batch_size, candidates=1)
    evaluations = teacher.sampler.evaluations_per_step * (1 if defaults.cfg == 1 else 2)
    emoji_suite = None if args.emoji_limit == 0 else HeldOutEmoji(size=defaults.height, limit=args.emoji_limit)

    timed = []  # (row, model, settings): timed together at the end, with nothing else running

    def row(name: str, model, settings, steps_evaluations: int, extra: dict | None = None) -> dict:
        start = time.perf_counter()
        result = {"model": name, "cfg": settings.cfg, "num_steps": settings.num_steps,
                  "head_evaluations_per_token": steps_evaluations,
                  **score(model, settings, args.images_per_tag, emoji_suite), **(extra or {})}
        result["seconds"] = round(time.perf_counter() - start, 1)
        print(json.dumps({k: v for k, v in result.items() if k not in ("shapes_per_tag", "distillation")}),
              flush=True)
        timed.append((result, model, settings))
        return result

    rows = [row("teacher", teacher, base, defaults.num_steps * evaluations)]
    for steps in args.steps:
        rows.append(row("teacher", teacher, replace(base, num_steps=steps),
                        steps * evaluations))
        changes = {name: value for name, value in (("iterations", args.iterations),
                                                   ("batch_size", args.student_batch_size)) if value is not None}
        config = HeadDistillationConfig(steps=steps, teacher_steps=args.teacher_steps, cfg=defaults.cfg, **changes)
        started = time.perf_counter()
        trajectories = record_for_distillation(teacher, prompts, config)
        recorded = round(time.perf_counter() - started, 2)
        for objective in args.objectives:
            distilled = fit_distilled_head(teacher, trajectories, config.replace(objective=objective))
            student = load_model(args.model).eval()
            student.config = student.config.replace(generation=defaults)
            install_distilled_head(student, distilled)
            if args.save is not None:
                student.save_pretrained(args.save / f"{Path(args.model).name}-{steps}-steps-{objective}")
            report = {key: distilled.report[key] for key in ("student_rmse", "initial_rmse", "teacher_rmse_at_steps",
                                                             "token_rms", "tokens", "losses", "batch_size")}
            report["seconds"] = {"teacher": recorded, **distilled.report["seconds"]}
            rows.append(row("student", student, SamplingSettings.from_defaults(
                student.config.generation, batch_size=args.batch_size), steps,
                {"objective": objective, "distillation": report}))

    latencies(timed, rounds=args.latency_rounds)
    payload = {"model": args.model, "teacher_steps": args.teacher_steps, "prompts": len(prompts),
               "shapes_repeats": args.shapes_repeats, "emoji_repeats": args.emoji_repeats,
               "images_per_tag": args.images_per_tag, "latency_rounds": args.latency_rounds, "rows": rows}
    path = write_results(args.output or f"distilled_head_{Path(args.model).name.replace('-', '_')}", payload)
    emoji = emoji_suite is not None
    lines = [f"Few-step heads distilled from {args.model} ({len(prompts)} teacher images on training prompts, "
             f"teacher {args.teacher_steps} steps). Held-out shapes GenEval, {args.images_per_tag} images per "
             "category" + (", held-out emoji" if emoji else "") + "; seconds per 64x64 image on this CPU.", "",
             "| model | objective | cfg | steps | head evaluations per token | shapes overall |"
             + (" emoji R@10 ratio | emoji Frechet ratio |" if emoji else "")
             + " s/image batch 1 | s/image batch 8 | sampled-token RMSE to the teacher |",
             "|---|---|---|---|---|---|" + ("---|---|" if emoji else "") + "---|---|---|"]
    for result in rows:
        distillation = result.get("distillation")
        rmse = "" if distillation is None else f"{distillation['student_rmse']:.3f}"
        lines.append(f"| {result['model']} | {result.get('objective', '')} | {result['cfg']:g} | "
                     f"{result['num_steps']} | {result['head_evaluations_per_token']} | {result['shapes']:.3f} |"
                     + (f" {result['emoji_r10_ratio']:.2f} | {result['emoji_frechet_ratio']:.2f} |" if emoji else "")
                     + f" {result['seconds_per_image_batch1']:.3f} | {result['seconds_per_image_batch8']:.3f} |"
                     + f" {rmse} |")
    markdown = results_path(args.output or f"distilled_head_{Path(args.model).name.replace('-', '_')}")
    atomic_write_text(markdown.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
