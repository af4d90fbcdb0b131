"""Token statistics under guidance: does strong guidance move generated tokens away from the data's?

NextStep-1 attributes the artefacts of strong guidance to a token-level
distribution shift that its tokenizer's per-position normalisation prevents.
This script measures, for every guidance scale, each token position's mean,
spread and outlier rate of the generated tokens against those of the real
images' tokens (`nextstep.evaluation.token_statistics`), on held-out emoji and
held-out shapes prompts:

1. the shipped model (its tokenizer standardises every latent position);
2. with ``--ablation-steps N``, an ablation: for each of ``--ablation-sizes``
   (image sides in pixels; 64 gives 16 tokens, 128 gives 64), two ``tiny``
   models trained for N steps from the same recipe
   (`recipes/tiny_emoji_shapes.json`, its data at that size), one on the
   shipped model's image tokenizer as it is (``layer_norm``), one on the same
   weights with FLUX.1's normalisation instead (``scale_shift``: one global
   scale and shift, fitted here to the training images' latents, so that the
   latents have mean 0 and variance 1 overall but not position by position).
   The runs go to ``--work`` and resume there.

Usage:
    python benchmarks/token_statistics.py [--scales 1,1.5,2,3,5,7.5] [--emoji 200] [--shapes 200]
        [--ablation-steps 3000] [--ablation-sizes 64,128] [--work outputs/token-statistics] [--out benchmarks/results]

Writes token_statistics.json and .md into --out, and each model's report
files (report.md, positions.csv) under --work.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, write_results  # noqa: E402

#: The ablation's image tokenizer: the encoder and decoder of the shipped model's tokenizer training.
ABLATION_TOKENIZER = Path(__file__).resolve().parents[1] / "pretrained" / "tokenizer_emoji_shapes"


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def held_out_pairs(emoji: int, shapes: int, size: int) -> tuple[list[str], list]:
    """Captions and real images: the first ``emoji`` held-out emoji and ``shapes`` scenes of held-out
    combinations."""
    from nextstep.training.data.emoji import EmojiConfig, EmojiDataset
    from nextstep.training.data.shapes.world import ShapesConfig, ShapesDataset

    samples = []
    if emoji:
        test = EmojiDataset(EmojiConfig(split="test", size=size))
        samples += [test.load(i) for i in range(min(emoji, len(test)))]
    if shapes:
        scenes = ShapesDataset(ShapesConfig(num_samples=shapes, size=size, split="test", combinations="held_out"))
        samples += [scenes.load(i) for i in range(shapes)]
    return [s.caption for s in samples], [s.image for s in samples]


def global_scale_shift(tokenizer_path: Path, images: int = 1024, size: int = 64) -> tuple[float, float]:
    """FLUX.1's latent normalisation fitted to a tokenizer: the scale and shift that give its raw latents of
    training images (emoji and shapes, alternately) mean 0 and variance 1 over every value."""
    import torch

    from nextstep.images import from_pil
    from nextstep.tokenizers.vae_checkpoints import load_flux_vae
    from nextstep.training.data.emoji import EmojiConfig, EmojiDataset
    from nextstep.training.data.shapes.world import ShapesConfig, ShapesDataset

    vae = load_flux_vae(tokenizer_path, normalization="none").eval()
    emoji = EmojiDataset(EmojiConfig(split="train", size=size))
    shapes = ShapesDataset(ShapesConfig(num_samples=images // 2, size=size))
    pictures = [emoji.load(i * len(emoji) // (images // 2)).image for i in range(images // 2)]
    pictures += [shapes.load(i).image for i in range(images // 2)]
    with torch.no_grad():
        latents = torch.cat([vae.encode(from_pil(pictures[i:i + 64])) for i in range(0, len(pictures), 64)])
    return 1.0 / float(latents.std()), float(latents.mean())


def ablation_model(variant: str, steps: int, size: int, work: Path) -> Path:
    """Train (or resume) the ``tiny`` model of the ablation on the ``variant`` normalisation, on images of ``size``
    pixels; its model folder."""
    from nextstep.tokenizers.vae_checkpoints import load_flux_vae, save_flux_vae
    from nextstep.training.recipe import load_recipe, run_recipe

    tokenizer = work / f"tokenizer-{variant}"
    if not tokenizer.is_dir():
        if variant == "layer_norm":
            vae = load_flux_vae(ABLATION_TOKENIZER)
        else:
            scale, shift = global_scale_shift(ABLATION_TOKENIZER)
            vae = load_flux_vae(ABLATION_TOKENIZER, normalization="scale_shift", scaling_factor=scale,
                                shift_factor=shift)
        save_flux_vae(vae, tokenizer)
    suffix = "" if size == 64 else f"-{size}"
    run = work / f"tiny-{variant}{suffix}"
    datasets = [{"type": "emoji", "split": "train", "size": size, "repeat": 2},
                {"type": "shapes", "split": "train", "num_samples": 8000, "size": size}]
    recipe = load_recipe("tiny_emoji_shapes", [
        f"image_tokenizer={tokenizer}", f"data.latent_cache={work / f'cache-{variant}{suffix}'}",
        f"data.datasets={json.dumps(datasets)}", f"data.resolution={size}", f"train.sample_height={size}",
        f"train.sample_width={size}", f"train.max_steps={steps}", "train.sample_every=0",
        f"train.checkpoint_every={max(steps // 4, 1)}"])
    run_recipe(recipe, run, show_progress=False)
    return run / "model"


def measure(name: str, folder: str, model, prompts, images, scales, work: Path, batch_size: int,
            size: int = 64) -> dict:
    from nextstep.evaluation.sampling import SamplingSettings
    from nextstep.evaluation.token_statistics import guidance_token_statistics

    defaults = model.config.generation
    settings = SamplingSettings.from_defaults(defaults, height=size, width=size, num_steps=20,
                                              batch_size=batch_size, candidates=1)
    start = time.perf_counter()
    report = guidance_token_statistics(model, prompts, images, scales=scales, settings=settings,
                                       output=work / f"report-{folder}")
    seconds = time.perf_counter() - start
    print(f"\n## {name} ({seconds:.0f} s)\n\n{report.to_markdown()}")
    return {"name": name, "seconds": round(seconds, 1), "report": report.to_dict(), "markdown": report.to_markdown()}


def summary_table(rows: list[dict]) -> str:
    """One line per model and scale: the token spread generated minus real and the absolute difference of the
    token means, over the first and the last quarter of the positions, and the outlier rate over all positions."""
    lines = ["| model | CFG | spread - real, first quarter | spread - real, last quarter | mean gap, first quarter | "
             "mean gap, last quarter | features beyond 4 (real) |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        report = row["report"]
        real_outliers = sum(report["real"]["outliers"]) / len(report["real"]["outliers"])
        for generated in report["generated"]:
            gaps = generated["gaps"]
            outliers = sum(generated["outliers"]) / len(generated["outliers"])
            lines.append(f"| {row['name']} | {generated['cfg']:g} | {gaps['std'][0]:+.3f} | {gaps['std'][-1]:+.3f} | "
                         f"{gaps['mean'][0]:.3f} | {gaps['mean'][-1]:.3f} | {outliers:.5f} ({real_outliers:.5f}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import torch

    import nextstep

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="emoji-shapes-64")
    parser.add_argument("--scales", type=_floats, default=[1.0, 1.5, 2.0, 3.0, 5.0, 7.5])
    parser.add_argument("--emoji", type=int, default=200, help="held-out emoji (their captions and images)")
    parser.add_argument("--shapes", type=int, default=200, help="held-out shapes scenes")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--ablation-steps", type=int, default=0,
                        help="train the two tiny models of the normalisation ablation this long (0: no ablation)")
    parser.add_argument("--ablation-sizes", type=lambda text: [int(v) for v in text.split(",") if v], default=[64],
                        help="image sizes of the ablation's models (each trains its own pair)")
    parser.add_argument("--work", type=Path, default=Path("outputs/token-statistics"))
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and Markdown files")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    prompts, images = held_out_pairs(args.emoji, args.shapes, 64)
    rows = [measure(args.model, args.model, nextstep.load_model(args.model), prompts, images, args.scales, args.work,
                    args.batch_size)]
    for size in args.ablation_sizes if args.ablation_steps else ():
        pairs = (prompts, images) if size == 64 else held_out_pairs(args.emoji, args.shapes, size)
        for variant in ("layer_norm", "scale_shift"):
            start = time.perf_counter()
            folder = ablation_model(variant, args.ablation_steps, size, args.work)
            print(f"trained tiny-{variant} at {size} px in {time.perf_counter() - start:.0f} s")
            rows.append(measure(f"tiny, {variant}, {size} px", f"tiny-{variant}-{size}",
                                nextstep.load_model(str(folder)), *pairs, args.scales, args.work, args.batch_size,
                                size))
    table = summary_table(rows)
    payload = {"scales": args.scales, "emoji": args.emoji, "shapes": args.shapes,
               "ablation_steps": args.ablation_steps, "ablation_sizes": args.ablation_sizes, "models": rows}
    path = write_results(str(args.out / "token_statistics.json"), payload)
    from nextstep.io import atomic_write_text

    atomic_write_text(args.out / "token_statistics.md", "\n\n".join(
        [f"Token statistics under guidance, {machine()['date']}: {args.emoji} held-out emoji and {args.shapes} "
         "held-out shapes scenes, their own seed per image at every scale.", table]
        + [f"## {row['name']}\n\n{row['markdown']}" for row in rows]) + "\n")
    print(f"\n{table}\n\nwrote {path} and token_statistics.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
