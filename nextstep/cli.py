"""The ``nextstep`` command line: ``generate`` and ``info``."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch


def _slug(text: str, limit: int = 48) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return slug[:limit] or "image"


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, found {value}")
    return number


def command_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from nextstep.builders import load_model
    from nextstep.generation import decode_tokens, generate_tokens
    from nextstep.images import image_grid, to_pil
    from nextstep.io import atomic_path

    model = load_model(args.model, device=args.device, seed=args.seed)
    out_dir = Path(args.output)
    grid_h, grid_w = model.image_tokenizer.grid_size(args.height, args.width)
    written = []
    all_images = []
    for index, prompt in enumerate(args.prompts):
        bar = tqdm(total=grid_h * grid_w, unit="tok", disable=args.quiet,
                   desc=f"[{index + 1}/{len(args.prompts)}] {prompt[:30]}")

        def progress(done: int, total: int) -> None:
            bar.update(1)

        tokens, grid_h, grid_w = generate_tokens(
            model, [prompt], height=args.height, width=args.width, cfg=args.cfg,
            num_steps=args.steps, shift=args.shift, seed=args.seed + index * args.num_images,
            negative_prompt=args.negative_prompt, num_images_per_prompt=args.num_images,
            progress=progress,
        )
        bar.close()
        images = to_pil(decode_tokens(model, tokens, grid_h, grid_w))
        for number, image in enumerate(images):
            path = out_dir / f"{index:03d}-{_slug(prompt)}-{number}.png"
            with atomic_path(path) as tmp:
                image.save(tmp, format="PNG")
            written.append(path)
        all_images.extend(images)
    if args.grid and all_images:
        path = out_dir / "grid.png"
        with atomic_path(path) as tmp:
            image_grid(all_images, columns=args.num_images if len(args.prompts) > 1 else None).save(tmp, format="PNG")
        written.append(path)
    for path in written:
        print(path)
    return 0


def command_info(args: argparse.Namespace) -> int:
    from nextstep.builders import build_model
    from nextstep.model import NextStep

    path = Path(args.model)
    if path.is_dir():
        model = NextStep.from_pretrained(path)
    else:
        with torch.device("meta"):
            model = build_model(args.model, with_text_tokenizer=False)
    counts = model.parameter_counts()
    config = model.current_config()
    rows = [
        ("image_tokenizer", config.image_tokenizer.type, counts["image_tokenizer"]),
        ("text_tokenizer", config.text_tokenizer.type, None),
        ("backbone", config.backbone.type, counts["backbone"]),
        ("lm_head", "tied" if model.lm_head.tied else "untied", counts["lm_head"]),
        ("backbone + lm_head", "", counts["backbone"] + counts["lm_head"]),
        ("projectors", "in/out", counts["projectors"]),
        ("image_head", config.image_head.type, counts["image_head"]),
        ("sampler", config.sampler.type, None),
        ("total", "", counts["total"]),
    ]
    print(f"model: {args.model}")
    for name, kind, count in rows:
        shown = "-" if count is None else f"{count:,} ({_human(count)})"
        print(f"  {name:<20} {kind:<14} {shown}")
    if args.config:
        print(json.dumps(config.to_dict(), indent=2))
    return 0


def _human(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.2f}{unit}"
    return str(count)


def build_parser() -> argparse.ArgumentParser:
    from nextstep.registry import model_names

    parser = argparse.ArgumentParser(prog="nextstep", description="NextStep-1 text-to-image models")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate images from prompts into PNG files")
    gen.add_argument("prompts", nargs="+", help="one or more prompts")
    gen.add_argument("--model", default="tiny",
                     help=f"a saved model directory or a preset name {model_names()}")
    gen.add_argument("--output", "-o", default="outputs", help="directory for the PNG files")
    gen.add_argument("--height", type=_positive_int, default=64)
    gen.add_argument("--width", type=_positive_int, default=64)
    gen.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale")
    gen.add_argument("--steps", type=_positive_int, default=50, help="head steps per token")
    gen.add_argument("--shift", type=float, default=1.0, help="time shift of the sampling grid")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--negative-prompt", default="")
    gen.add_argument("--num-images", type=_positive_int, default=1, help="images per prompt")
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--grid", action="store_true", help="also write grid.png with every image")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(handler=command_generate)

    info = commands.add_parser("info", help="components, parameter counts and config of a model")
    info.add_argument("model", help="a preset name or a saved model directory")
    info.add_argument("--config", action="store_true", help="also print the config as JSON")
    info.set_defaults(handler=command_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"nextstep {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
