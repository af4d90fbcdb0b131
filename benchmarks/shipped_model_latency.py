"""How long the shipped model takes to make a 64x64 image on this CPU.

Two measurements:

* ``nextstep generate`` end to end, as a user runs it: a fresh process that
  imports the library, loads ``emoji-shapes-64`` from the package, generates one
  image with the command's defaults (the model's own settings: 64x64, its
  guidance, 20 Euler steps per token, its number of candidates) and writes the
  PNG. The best of ``--repeats`` runs;
* in process, the model already loaded: seconds per image at batch 1 and 8 with
  the model's settings, with them drawing each image once (when the model
  draws several candidates), with them keeping the best of 4 by each candidate
  score (`nextstep.reranking.CANDIDATE_SCORES`), and with the NextStep-1
  release's (CFG 7.5, 50 steps, one draw).

Usage:
    python benchmarks/shipped_model_latency.py [--repeats 3]

Writes benchmarks/results/shipped_model_latency.json (or --output).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_time, write_results  # noqa: E402

PROMPT = "a red circle to the left of a blue square"


def command_seconds(repeats: int) -> float:
    times = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "nextstep", "generate", PROMPT, "--output", out, "--quiet"],
                           check=True, capture_output=True)
            times.append(time.perf_counter() - start)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default="shipped_model_latency", help="results name or path (common.results_path)")
    args = parser.parse_args()

    from nextstep import load_model
    from nextstep.reranking import CANDIDATE_SCORES

    results = {"command_seconds_per_image": command_seconds(args.repeats), "in_process": []}
    print(f"nextstep generate (1 image, defaults, fresh process): {results['command_seconds_per_image']:.2f} s")
    model = load_model("emoji-shapes-64").eval()
    own = model.config.generation
    settings = [(own.cfg, own.cfg_schedule, own.num_steps, own.candidates, own.candidate_score)]
    if own.candidates != 1:
        settings.append((own.cfg, own.cfg_schedule, own.num_steps, 1, own.candidate_score))
    settings += [(own.cfg, own.cfg_schedule, own.num_steps, 4, score) for score in CANDIDATE_SCORES]
    settings.append((7.5, "constant", 50, 1, own.candidate_score))
    for cfg, schedule, steps, candidates, score in dict.fromkeys(settings):
        for batch in (1, 8):
            prompts = [PROMPT] * batch

            def run():
                with torch.no_grad():
                    model.generate(prompts, height=64, width=64, cfg=cfg, cfg_schedule=schedule, num_steps=steps,
                                   seed=0, candidates=candidates, candidate_score=score)

            seconds = best_time(run, repeats=args.repeats) / batch
            results["in_process"].append({"cfg": cfg, "cfg_schedule": schedule, "steps": steps,
                                          "candidates": candidates, "candidate_score": score, "batch": batch,
                                          "seconds_per_image": seconds})
            ranked = f" ranked by {score}" if candidates > 1 else ""
            print(f"in process, cfg {cfg} ({schedule}), {steps} steps, {candidates} candidate(s){ranked}, "
                  f"batch {batch}: {seconds:.3f} s/image")
    path = write_results(args.output, results)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
