"""What int8 decode weights cost in image quality: held-out shapes GenEval of the shipped model, paired.

The same prompts and seeds sampled twice through `nextstep.fast.FastTokenSampler`
with the fused decode step: once multiplying by the model's own weights, once
by per-row int8 copies (`nextstep.fast.weight_quantization`), which halve the
bytes a batch-1 decode step reads on a GPU. Each image is judged by the exact
shapes detector (`nextstep.evaluation.shapes_geneval`); the script reports both
scores, how many images changed their verdict, and the relative difference of
the sampled tokens.

Usage:
    python benchmarks/decode_weights_quality.py                    # 100 images per category, about 1.5 minutes here
    python benchmarks/decode_weights_quality.py --images-per-tag 8 --output quick   # results/quick.json

Writes benchmarks/results/decode_weights_quality.json (or --output).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

#: The two ways compared: `nextstep.fast.token_sampler.TOKEN_SAMPLERS` names.
VARIANTS = {"model weights": "fused", "int8 weights": "int8"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="emoji-shapes-64", help="a shipped model's name or a saved model")
    parser.add_argument("--images-per-tag", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="decode_weights_quality",
                        help="a name under benchmarks/results/ (.json added), or a file path")
    args = parser.parse_args(argv)

    from dataclasses import replace

    from nextstep import load_model
    from nextstep.evaluation.sampling import SamplingSettings
    from nextstep.evaluation.shapes_geneval import run_shapes_geneval
    from nextstep.fast.token_sampler import token_sampler_named
    from nextstep.generation import generate_tokens

    torch.set_num_threads(2)
    model = load_model(args.model).eval()
    settings = SamplingSettings.from_defaults(model.config.generation, seed=args.seed)
    payload = {"command": " ".join(sys.argv), "model": args.model,
               "settings": settings.to_dict(), "images_per_tag": args.images_per_tag, "variants": {}}
    verdicts = {}
    with tempfile.TemporaryDirectory() as directory:
        for name, token_sampler in VARIANTS.items():
            begin = time.perf_counter()
            report = run_shapes_geneval(model, Path(directory) / token_sampler, images_per_tag=args.images_per_tag,
                                        settings=replace(settings, token_sampler=token_sampler), with_ceiling=False)
            seconds = time.perf_counter() - begin
            lines = (Path(directory) / token_sampler / "results.jsonl").read_text().splitlines()
            verdicts[name] = [json.loads(line)["correct"] for line in lines]
            payload["variants"][name] = {"overall": report.overall, "per_tag": report.per_tag, "seconds": seconds}
            print(f"{name}: held-out shapes {report.overall:.3f} "
                  f"({', '.join(f'{tag} {value:.2f}' for tag, value in report.per_tag.items())}) in {seconds:.0f} s",
                  flush=True)
    first, second = verdicts.values()
    changed = sum(a != b for a, b in zip(first, second))
    payload["images"] = len(first)
    payload["verdicts_changed"] = changed
    payload["verdicts_changed_right_to_wrong"] = sum(a and not b for a, b in zip(first, second))
    payload["verdicts_changed_wrong_to_right"] = sum(b and not a for a, b in zip(first, second))

    # Token-level difference on a few prompts: the same draws through both weights.
    prompts = ["a red circle", "two blue squares", "a green triangle above a yellow square", "grinning face"]
    tokens = {name: generate_tokens(model, prompts, seed=args.seed,
                                    token_sampler=token_sampler_named(model, token_sampler))[0]
              for name, token_sampler in VARIANTS.items()}
    reference, quantized = tokens.values()
    payload["token_relative_difference"] = ((quantized - reference).norm() / reference.norm()).item()
    print(f"verdicts changed on {changed} of {len(first)} images "
          f"({payload['verdicts_changed_right_to_wrong']} right to wrong, "
          f"{payload['verdicts_changed_wrong_to_right']} wrong to right); tokens differ by "
          f"{payload['token_relative_difference']:.2%} (relative norm)", flush=True)
    path = write_results(args.output, payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
