"""How close each ODE sampler gets to the exact sample for a given number of head evaluations.

The shipped model (``emoji-shapes-64``, its own CFG) samples each image token by
integrating the guided velocity of its flow head from noise at t=0 to t=1. This
script measures the integration error alone, as a function of the head
evaluations per token, for the deterministic samplers:

* per token: the conditions of every token of a reference generation are kept
  (both CFG branches); for each, each sampler integrates the same guided field
  from the same noise, and its result is compared with a 1,024-step Heun
  solution (relative RMS error: RMS of the difference over RMS of the exact
  tokens, all tokens together);
* per image: whole generations with each sampler, decoded, against the image the
  reference solver makes from the same seeds (PSNR, higher is closer). Here an
  error in one token also changes the conditions of the later ones.

Usage:
    python benchmarks/solver_accuracy.py            # about 2 minutes on 2 cores

Writes benchmarks/results/solver_accuracy.json (or --output).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

PROMPTS = ["grinning face", "a red circle to the left of a blue square", "red heart", "three green triangles",
           "smiling cat face", "a blue square above a yellow circle", "thumbs up", "fire"]
SAMPLERS = ("euler", "midpoint", "heun", "adams_bashforth")
BUDGETS = (4, 6, 8, 10, 16, 20, 32, 50)
REFERENCE_STEPS = 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="solver_accuracy", help="results name or path (common.results_path)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from nextstep import generate_tokens, load_model
    from nextstep.evaluation.image_metrics import psnr
    from nextstep.generation import decode_tokens
    from nextstep.registry import component_class
    from nextstep.samplers import GuidedVelocity, guidance_for_scale
    from nextstep.samplers.time_grid import time_grid

    torch.manual_seed(args.seed)
    model = load_model("emoji-shapes-64").eval()
    own = model.config.generation
    guidance = guidance_for_scale(own.cfg)
    size = dict(height=own.height, width=own.width)
    samplers = {name: component_class("sampler", name)() for name in SAMPLERS}
    reference_sampler = samplers["heun"]

    # Conditions (G, R, C) of every token of a reference generation.
    conditions: list[torch.Tensor] = []
    hook = model.image_out_projector.register_forward_hook(lambda module, inputs, output: conditions.append(output))
    with torch.inference_mode():
        reference_tokens, grid_h, grid_w = generate_tokens(model, PROMPTS, cfg=own.cfg, num_steps=REFERENCE_STEPS,
                                                           sampler=reference_sampler, seed=args.seed, **size)
    hook.remove()
    conditions = [c.view(guidance.num_branches, len(PROMPTS), -1) for c in conditions]
    noise = torch.randn(len(conditions), len(PROMPTS), model.token_dim,
                        generator=torch.Generator().manual_seed(args.seed + 1))

    def integrate(sampler, steps: int) -> torch.Tensor:
        grid = time_grid(steps)
        with torch.inference_mode():
            return torch.stack([sampler.sample(GuidedVelocity(model.image_head, c, guidance), x, grid)
                                for c, x in zip(conditions, noise)])

    exact = integrate(reference_sampler, REFERENCE_STEPS)
    scale = exact.pow(2).mean().sqrt()
    with torch.inference_mode():
        reference_images = decode_tokens(model, reference_tokens, grid_h, grid_w).float()

    rows = []
    for name, sampler in samplers.items():
        for budget in BUDGETS:
            if budget % sampler.evaluations_per_step:
                continue
            steps = budget // sampler.evaluations_per_step
            error = float((integrate(sampler, steps) - exact).pow(2).mean().sqrt() / scale)
            with torch.inference_mode():
                tokens, _, _ = generate_tokens(model, PROMPTS, cfg=own.cfg, num_steps=steps, sampler=sampler,
                                               seed=args.seed, **size)
                images = decode_tokens(model, tokens, grid_h, grid_w).float()
            image_psnr = float(psnr(images, reference_images).mean())
            rows.append({"sampler": name, "evaluations": budget, "steps": steps, "token_error": error,
                         "image_psnr": image_psnr})
            print(f"{name:>16} {budget:>3} evaluations ({steps:>2} steps): token error {error:.2e}, "
                  f"image PSNR {image_psnr:5.1f} dB")

    results = {"model": "emoji-shapes-64", "cfg": own.cfg, "shift": 1.0, "prompts": PROMPTS,
               "tokens": len(conditions) * len(PROMPTS), "reference": f"heun, {REFERENCE_STEPS} steps",
               "rows": rows}
    path = write_results(args.output, results)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
