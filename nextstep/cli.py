"""The ``nextstep`` command line: generation, captioning, inspection, training, evaluation and conversion."""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

import torch


def _slug(text: str, limit: int = 48) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return slug[:limit] or "image"


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, found {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, found {value}")
    return number


#: The largest float32: scales above it overflow where they are applied.
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _scale(value: str) -> float:
    """A finite number >= 0: a guidance scale or a temperature."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, found {value!r}") from None
    if not 0 <= number <= FLOAT32_MAX:  # the guidance and noise are scaled in float32
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0 (at most {FLOAT32_MAX:.4g}), found {value}")
    return number



def _output_folder(value: str) -> str:
    """A folder to write into: refused when a file is in its place or in the place of a folder above it."""
    for folder in (Path(value), *Path(value).parents):
        if folder.exists():
            if not folder.is_dir():
                where = "" if folder == Path(value) else f" (on the way to {value})"
                raise argparse.ArgumentTypeError(f"expected a folder to write into at {folder}{where}, found a file")
            break
    return value


def _device(value: str) -> str:
    """A device name torch knows, on a machine that has it (`nextstep.devices.available_device`)."""
    from nextstep.devices import available_device

    try:
        available_device(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value


#: What `nextstep generate` records in its output folder: for each image file, the request it answers.
GENERATION_RECORD = "generation.json"
#: What `nextstep eval` records in its output folder before it runs a suite: the model, the settings and
#: the suites' options.
EVALUATION_RECORD = "evaluation.json"
#: What `nextstep eval` of several models writes beside their folders: the models and each one's headline numbers.
COMPARISON_RECORD = "comparison.json"
#: Options of `generate` that are not part of the request an image answers: where it goes, how the run
#: reports, and the device (the same images up to rounding).
UNRECORDED_OPTIONS = ("handler", "command", "imports", "command_imports", "output", "quiet", "device", "overwrite")
#: Options of `eval` that change a suite's results besides the model and the sampling settings, by suite.
EVALUATION_OPTIONS = {"shapes": ("images_per_tag",), "emoji": ("limit",), "captioning": ("scenes_per_group",),
                      "tokenizer": ("crops",)}
#: Titles of the suites' sections in ``summary.md``.
SUITE_TITLES = {"shapes": "Shapes GenEval (held-out prompts)", "emoji": "Held-out emoji",
                "captioning": "Shapes captioning (greedy)",
                "tokenizer": "Tokenizer reconstruction (held-out photo crops)"}


def _generation_request(args: argparse.Namespace) -> dict:
    """The options an image answers, with what identifies the model's files (`model_fingerprint`) and the
    input image's bytes: the same command after either changed makes other images."""
    from nextstep.pretrained import model_fingerprint

    request = {key: value for key, value in sorted(vars(args).items()) if key not in UNRECORDED_OPTIONS}
    request["model_fingerprint"] = model_fingerprint(args.model)
    if args.image is not None and Path(args.image).is_file():
        request["image_sha256"] = hashlib.sha256(Path(args.image).read_bytes()).hexdigest()[:16]
    return request


#: What a generation record holds besides the options: files' identities (absent from records written before
#: they were recorded, which then compare on the options alone) and the settings the options resolved to.
RECORDED_IDENTITIES = ("model_fingerprint", "image_sha256")


def _requested(entry: dict | None, wanted: dict) -> dict | None:
    """A file's record as it compares with the request ``wanted``: without the settings it was resolved to
    (``resolved``, which follow from the request), and with the identities it does not record taken as
    ``wanted``'s, and the options it does not record (written before they existed) as ``wanted``'s where
    ``wanted`` leaves them unset."""
    if entry is None:
        return None
    if "replacing" in entry:  # a write cut short between its record and its file: it answers either request
        landed = {key: value for key, value in entry.items() if key != "replacing"}
        earlier = _requested(entry["replacing"], wanted)
        return earlier if earlier == wanted else _requested(landed, wanted)
    unrecorded = {key: value for key, value in wanted.items()
                  if key not in entry and (key in RECORDED_IDENTITIES or value is None)}
    return {**{key: value for key, value in entry.items() if key != "resolved"}, **unrecorded}


def _check_overwrite(existing: list[Path], saved: dict | None, request: dict, what: str) -> None:
    """Refuse to replace ``existing`` files that an earlier request other than ``request`` wrote (``saved``: the
    request of the first of them, or None when it is not known), naming them and the settings that differ."""
    if not existing:
        return
    if saved is None:
        reason = "whose settings are not recorded"
    else:
        keys = sorted(key for key in set(saved) | set(request) if saved.get(key) != request.get(key))
        reason = "with other settings: " + ", ".join(f"{key} {saved.get(key)!r} there, {request.get(key)!r} here"
                                                      for key in keys)
    more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
    raise FileExistsError(f"{existing[0].parent} already holds {existing[0].name}{more} from another {what} "
                          f"({reason}); pass --overwrite to replace them, or choose another --output")


def _read_record(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _create_output_folder(folder: Path) -> None:
    """Create ``folder`` (and its parents), or raise ``OSError`` naming it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(f"cannot create the output folder {folder}: {error.strerror or error}") from None


def _sampler_options(options: list[str] | None) -> dict:
    """``--sampler-option KEY=VALUE`` texts as the fields they set (values read as JSON, else as text)."""
    changes = {}
    for option in options or []:
        key, separator, text = option.partition("=")
        if not separator or not key.strip():
            raise ValueError(f"--sampler-option expects KEY=VALUE, found {option!r}")
        try:
            changes[key.strip()] = json.loads(text)
        except ValueError:
            changes[key.strip()] = text
    return changes


def command_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from nextstep.builders import load_model
    from nextstep.fast.token_sampler import token_sampler_named
    from nextstep.generation import (
        checked_request,
        decode_tokens,
        generate_tokens,
        resolved_settings,
        sampler_with_options,
    )
    from nextstep.images import image_grid, read_image_file, to_pil
    from nextstep.io import atomic_path, atomic_write_text

    out_dir = Path(args.output)
    request = _generation_request(args)
    # What each file answers: an image, its prompt at its index (which seeds it) and the sampling options;
    # the grid, the whole request.
    common = {key: value for key, value in request.items() if key not in ("prompts", "grid")}
    expected = {f"{index:03d}-{_slug(prompt)}-{number}.png": {**common, "prompt": prompt, "index": index}
                for index, prompt in enumerate(args.prompts) for number in range(args.num_images)}
    if args.grid:
        expected["grid.png"] = request
    records = _read_record(out_dir / GENERATION_RECORD) or {}  # file -> the request it answers

    def recorded(path: Path, resolved: dict, replacing: bool = False) -> bool:
        """Record ``path`` as this request's (a rerun after an interruption goes on), with what another run
        recorded meanwhile kept. ``replacing``: before the file is written, when another request's file there is
        replaced it is recorded as answering either (a crash between the two writes refuses neither), and
        True is returned: record it again once it lands. A new file is recorded as this request's at once
        (no file, no claim on one)."""
        current = _read_record(out_dir / GENERATION_RECORD) or {}
        entry = {**expected[path.name], "resolved": resolved}
        earlier = current.get(path.name)
        if earlier == entry:
            return False
        marked = replacing and path.exists()
        current[path.name] = {**entry, "replacing": earlier} if marked else entry
        atomic_write_text(out_dir / GENERATION_RECORD, json.dumps(current, indent=2) + "\n")
        return marked
    for name in expected:  # before the model loads
        if (out_dir / name).exists() and not (out_dir / name).is_file():
            raise FileExistsError(f"expected a PNG file or nothing at {out_dir / name}, found a directory")
    model = load_model(args.model, device=args.device, seed=args.seed)
    token_sampler = token_sampler_named(model, args.token_sampler)
    sampler = sampler_with_options(model.config.sampler, args.sampler, _sampler_options(args.sampler_option))
    source = None
    if args.image is not None:
        source = read_image_file(args.image)
    # The settings the images are drawn with, the model's own where the command leaves them unset.
    resolved = resolved_settings(model, editing=source is not None, cfg=args.cfg, cfg_schedule=args.cfg_schedule,
                                 num_steps=args.steps, shift=args.shift, sampler=args.sampler,
                                 temperature=args.temperature, cfg_img=args.cfg_img, candidates=args.candidates,
                                 candidate_score=args.candidate_score, negative_prompt=args.negative_prompt)
    checked_request(model, args.prompts, editing=source is not None, cfg=args.cfg, cfg_img=args.cfg_img,
                    cfg_schedule=args.cfg_schedule, num_steps=args.steps, shift=args.shift, seed=args.seed,
                    negative_prompt=args.negative_prompt, num_images_per_prompt=args.num_images, sampler=sampler,
                    temperature=args.temperature, candidates=args.candidates, candidate_score=args.candidate_score)
    if not args.overwrite:  # images of another request are not replaced (a request checked first)
        others = [name for name, wanted in expected.items()
                  if (out_dir / name).exists() and _requested(records.get(name), wanted) != wanted]
        if others:
            _check_overwrite([out_dir / name for name in others],
                             _requested(records.get(others[0]), expected[others[0]]), expected[others[0]],
                             "generation")
    _create_output_folder(out_dir)  # before anything is sampled
    written = []
    all_images = []
    for index, prompt in enumerate(args.prompts):
        bars = []  # made at the first token, so that a refused setting prints no empty bar

        def progress(done: int, total: int, index=index, prompt=prompt, bars=bars) -> None:
            if not bars:
                bars.append(tqdm(unit="tok", disable=args.quiet, total=total,
                                 desc=f"[{index + 1}/{len(args.prompts)}] {prompt[:30]}"))
            bars[0].update(1)

        tokens, grid_h, grid_w = generate_tokens(
            model, [prompt], height=args.height, width=args.width, cfg=args.cfg,
            num_steps=args.steps, shift=args.shift, seed=args.seed + index * args.num_images,
            negative_prompt=args.negative_prompt, num_images_per_prompt=args.num_images,
            progress=progress, sampler=sampler, cfg_schedule=args.cfg_schedule,
            temperature=args.temperature, images=None if source is None else [source], cfg_img=args.cfg_img,
            candidates=args.candidates, candidate_score=args.candidate_score, token_sampler=token_sampler,
        )
        for bar in bars:
            bar.close()
        if not torch.isfinite(tokens).all():  # a diverged sampling: refused rather than saved black
            raise FloatingPointError(f"the tokens of {prompt!r} are not finite: sampling diverged; a smaller --cfg, "
                                     "--temperature or --shift, or more --steps, keeps it finite")
        images = to_pil(decode_tokens(model, tokens, grid_h, grid_w))
        for number, image in enumerate(images):
            path = out_dir / f"{index:03d}-{_slug(prompt)}-{number}.png"
            settings = {**resolved, "height": image.height, "width": image.width}
            replacing = recorded(path, settings, replacing=True)
            with atomic_path(path) as tmp:
                image.save(tmp, format="PNG")
            written.append(path)
            if replacing:
                recorded(path, settings)
        all_images.extend(images)
    if args.grid and all_images:
        path = out_dir / "grid.png"
        replacing = recorded(path, resolved, replacing=True)
        with atomic_path(path) as tmp:
            image_grid(all_images, columns=args.num_images if len(args.prompts) > 1 else None).save(tmp, format="PNG")
        written.append(path)
        if replacing:
            recorded(path, resolved)
    for path in written:
        print(path)
    return 0


def command_caption(args: argparse.Namespace) -> int:
    from nextstep.builders import load_model
    from nextstep.images import read_image_file
    from nextstep.text_generation import caption_images
    from nextstep.text_sampling import check_text_sampling

    check_text_sampling(args.temperature, args.top_k, args.top_p)  # before anything loads
    images = [read_image_file(path) for path in args.images]
    model = load_model(args.model, device=args.device, seed=args.seed)
    for path, image in zip(args.images, images):
        try:
            model.image_tokenizer.grid_size(image.height, image.width)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
    result = caption_images(model, images, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    for path, text in zip(args.images, result.texts):
        print(f"{path}\t{' '.join(text.split())}")  # one line: breaks and tabs inside a caption become spaces
    return 0


def command_info(args: argparse.Namespace) -> int:
    from nextstep.builders import build_model, check_preset_name
    from nextstep.model import NextStep
    from nextstep.pretrained import model_directory

    directory = model_directory(args.model)
    if directory is not None:
        model = NextStep.from_pretrained(directory)
    else:
        check_preset_name(args.model)
        with torch.device("meta"):
            model = build_model(args.model, with_text_tokenizer=False)
    counts = model.parameter_counts()
    config = model.current_config()
    rows = [
        ("image_tokenizer", config.image_tokenizer.type, counts["image_tokenizer"]),
        ("text_tokenizer", config.text_tokenizer.type,
         None if model.text_tokenizer is None else _id_counts(model.text_tokenizer)),
        ("backbone", config.backbone.type, counts["backbone"]),
        ("lm_head", "tied" if model.lm_head.tied else "untied", counts["lm_head"]),
        ("backbone + lm_head", "", counts["backbone"] + counts["lm_head"]),
        ("projectors", "in/out", counts["projectors"]),
        ("image_head", config.image_head.type, counts["image_head"]),
        *((("word_vectors", f"{config.word_vectors.count:,} x {config.word_vectors.dim}",
            counts["word_vectors"]),) if "word_vectors" in counts else ()),
        ("sampler", config.sampler.type, None),
        ("total", "", counts["total"]),
    ]
    print(f"model: {args.model}")
    width = max(14, *(len(kind) for _, kind, _ in rows))  # the counts in one column, whatever the names
    for name, kind, count in rows:
        shown = "-" if count is None else count if isinstance(count, str) else f"{count:,} ({_human(count)})"
        print(f"  {name:<20} {kind:<{width}} {shown}")
    generation = config.generation
    best_of = (f", best of {generation.candidates} by the {generation.candidate_score} score"
               if generation.candidates > 1 else "")
    print(f"  generation: cfg {generation.cfg:g} ({generation.cfg_schedule}), {generation.num_steps} steps, "
          f"{generation.height}x{generation.width}{best_of}")
    if args.config:
        print(json.dumps(config.to_dict(), indent=2))
    return 0


def _run_training(args: argparse.Namespace, load, run, command: str, product: tuple[str, str]) -> int:
    """Run the recipe ``args`` names with ``load`` and ``run``, into ``args.output`` or outputs/<command>/<recipe>;
    ``product``: (what the run makes, its folder in the output), printed with the log and last checkpoint."""
    import logging

    from nextstep.training.data.base import DataQualityError
    from nextstep.training.recipe import find_recipe

    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    overrides = list(args.set or [])
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    recipe = load(args.recipe, overrides)
    output = Path(args.output) if args.output else Path("outputs") / command / find_recipe(args.recipe).stem
    try:
        trainer = run(recipe, output, resume=not args.no_resume, show_progress=not args.quiet)
    except DataQualityError as error:
        print(f"nextstep {command}: error: {error}", file=sys.stderr)
        return 2
    if trainer.context.is_main:
        print(f"log: {output / 'train_log.csv'}")
        latest = trainer.checkpoints.latest()
        if latest is not None:
            print(f"checkpoint: {latest}")
        kind, folder = product
        if (output / folder).is_dir():
            print(f"{kind}: {output / folder}")
    return 0


def command_train(args: argparse.Namespace) -> int:
    from nextstep.training.recipe import MODEL_DIR, load_recipe, run_recipe

    return _run_training(args, load_recipe, run_recipe, "train", ("model", MODEL_DIR))


def command_train_tokenizer(args: argparse.Namespace) -> int:
    from nextstep.training.tokenizer_recipe import TOKENIZER_DIR, load_tokenizer_recipe, run_tokenizer_recipe

    return _run_training(args, load_tokenizer_recipe, run_tokenizer_recipe, "train-tokenizer",
                         ("tokenizer", TOKENIZER_DIR))


def command_eval_tokenizer(args: argparse.Namespace) -> int:
    from nextstep.evaluation.tokenizer_report import run_tokenizer_evaluation
    from nextstep.io import names_a_path
    from nextstep.presets import flux_vae_config
    from nextstep.tokenizers import FluxVAE
    from nextstep.tokenizers.vae_checkpoints import load_flux_vae

    _create_output_folder(Path(args.output))  # before anything is evaluated
    path = Path(args.tokenizer)
    if path.exists():
        tokenizer = load_flux_vae(path)
    elif names_a_path(args.tokenizer):
        raise FileNotFoundError(f"expected a VAE checkpoint at {args.tokenizer!r}, found nothing")
    else:
        torch.manual_seed(args.seed)
        tokenizer = FluxVAE(flux_vae_config(args.tokenizer))
    report = run_tokenizer_evaluation(tokenizer, Path(args.output), count=args.count, size=args.size,
                                      seed=args.seed)
    print(report.to_markdown())
    print(f"wrote {args.output}/report.json, report.md, reconstructions.png")
    return 0


EVAL_SUITES = ("shapes", "emoji", "captioning", "tokenizer")


def _square_sampling_settings(generation, own_sampler, args: argparse.Namespace):
    """`SamplingSettings` from a model's ``generation`` block (`GenerationDefaults`), its default sampler (a
    `ComponentSpec`, which checks ``--sampler-option``) and the sampling options of ``args`` (see
    `_add_sampling_options`); square images, ``--size`` or the model's own side."""
    from nextstep.evaluation.sampling import SamplingSettings
    from nextstep.generation import sampler_with_options

    sampler_options = _sampler_options(args.sampler_option) or None
    sampler_with_options(own_sampler, args.sampler, sampler_options or {})  # refused before anything is drawn

    chosen = generation.overridden(cfg=args.cfg, cfg_schedule=args.cfg_schedule, num_steps=args.steps,
                                   candidates=args.candidates, candidate_score=args.candidate_score)
    size = args.size
    if size is None:
        if chosen.height != chosen.width:
            raise ValueError(f"square images are drawn here and the model generates {chosen.height}x"
                             f"{chosen.width} by default: give --size")
        size = chosen.height
    return SamplingSettings.from_defaults(chosen, height=size, width=size, seed=args.seed,
                                          batch_size=args.batch_size, sampler=args.sampler,
                                          sampler_options=sampler_options, temperature=args.temperature,
                                          token_sampler=args.token_sampler)


def _image_progress(desc: str, quiet: bool, unit: str = "img"):
    """A tqdm bar of images (or other ``unit``) and the ``progress(done, total)`` callback that moves it."""
    from tqdm import tqdm

    bar = tqdm(unit=unit, disable=quiet, desc=desc)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    return bar, progress


def command_eval(args: argparse.Namespace) -> int:
    from nextstep.evaluation.model_comparison import comparison_markdown, comparison_row
    from nextstep.evaluation.report_files import dumps_strict
    from nextstep.io import atomic_write_text

    suites = EVAL_SUITES if "all" in args.suite else tuple(dict.fromkeys(args.suite))
    if "emoji" in suites and args.limit is not None and args.limit < 10:  # before any suite runs
        raise ValueError(f"the emoji evaluation needs at least 10 held-out emoji: --limit must be >= 10, found "
                         f"{args.limit}")
    models = list(dict.fromkeys(args.model))
    output = Path(args.output)
    prepared: dict = {}  # the held-out emoji suite by (image side, limit): prepared once for every model
    if len(models) == 1:
        _evaluate_model(models[0], output, args, suites, prepared)
        return 0
    folders = _model_folders(models, output)  # every name checked before any model loads
    if args.sampler_option:  # and the sampler options against every model's sampler
        from nextstep.builders import model_sampler_spec
        from nextstep.generation import sampler_with_options

        for model in models:
            try:
                sampler_with_options(model_sampler_spec(model), args.sampler, _sampler_options(args.sampler_option))
            except ValueError as error:
                raise ValueError(f"{model}: {error}") from None
    saved = _read_record(output / COMPARISON_RECORD)
    if not args.overwrite and (saved is None or saved.get("models") != models):
        _check_overwrite([output / name for name in (COMPARISON_RECORD, "comparison.md") if (output / name).exists()],
                         saved and {"models": saved.get("models")}, {"models": models}, "comparison")
    rows = [comparison_row(model, folders[model].name,
                           _evaluate_model(model, folders[model], args, suites, prepared, label=f"{model}: "))
            for model in models]
    table = comparison_markdown(rows)
    atomic_write_text(output / COMPARISON_RECORD, dumps_strict({"models": models, "rows": rows}, indent=2) + "\n")
    atomic_write_text(output / "comparison.md", f"# Evaluation of {len(models)} models\n\n{table}")
    print(f"\n{table}\nwrote {output}/{COMPARISON_RECORD}, comparison.md and one folder per model")
    return 0


def _model_folders(models: list[str], output: Path) -> dict[str, Path]:
    """Where `nextstep eval` puts each of several models' evaluations: the folder under ``output`` named after the
    model's folder, or after the shipped model or preset it names. Refuses a name that is no model, and two models
    whose folders would have one name."""
    from nextstep.builders import check_preset_name
    from nextstep.pretrained import model_directory

    folders: dict[str, Path] = {}
    for model in models:
        if model_directory(model) is None:
            check_preset_name(model)
        folder = output / (Path(model).name or Path(model).resolve().name)
        clash = next((other for other, taken in folders.items() if taken == folder), None)
        if clash is not None:
            raise ValueError(f"models {clash!r} and {model!r} would both be evaluated into {folder}: evaluate them "
                             "in separate runs, or name folders of different names")
        folders[model] = folder
    return folders


def _evaluate_model(name: str, output: Path, args: argparse.Namespace, suites: tuple[str, ...], prepared: dict,
                    label: str = "") -> dict:
    """Run ``suites`` on the model ``name`` into ``output`` (its record first, then each suite, then its summary),
    refusing to replace another evaluation's results there; return the summary. ``prepared`` keeps the held-out
    emoji suite of each (image side, limit) for the next model; ``label`` starts each progress bar's name."""
    from nextstep.builders import load_model
    from nextstep.io import atomic_write_text

    model = load_model(name, device=args.device, seed=args.seed)
    settings = _square_sampling_settings(model.config.generation, model.config.sampler, args)
    size = settings.height
    summary: dict = {"model": name, "settings": settings.to_dict()}
    # What the results depend on: the model, the sampling settings (not the batch size) and each suite's options.
    record = _evaluation_record(name, settings.to_dict(), {
        suite: {option: getattr(args, option) for option in EVALUATION_OPTIONS[suite]} for suite in suites})
    saved = _read_record(output / EVALUATION_RECORD)
    if saved is not None and isinstance(saved.get("settings"), dict):  # a setting added since it was written:
        saved["settings"] = {**{key: None for key, value in record["settings"].items() if value is None},
                             **saved["settings"]}  # that run had it unset, as this one leaves it
    same_run = saved is not None and all(saved.get(key) == record[key] for key in ("model", "settings")) and \
        saved.get("model_fingerprint", record["model_fingerprint"]) == record["model_fingerprint"]  # older: none
    # This folder's suites finished and interrupted with these settings (none when it holds another run).
    finished, interrupted = (saved["suites"], saved.get("running", {})) if same_run else ({}, {})
    if not args.overwrite:  # the results of another model, settings or options are not replaced
        if not same_run:
            existing = [output / file for file in ("summary.json", *suites) if (output / file).exists()]
        else:  # a suite's folder from a finished or an interrupted run with the same options goes ahead
            existing = [output / suite for suite in suites if (output / suite).exists()
                        and record["suites"][suite] not in (finished.get(suite), interrupted.get(suite))]
        _check_overwrite(existing, saved and {k: v for k, v in saved.items() if k != "running"}, record,
                         "evaluation")
    earlier = (_read_record(output / "summary.json") or {}) if same_run else {}
    if args.skip_finished:  # suites finished here with these options, whose summary is here, are not run again
        kept = [suite for suite in suites
                if finished.get(suite) == record["suites"][suite] and isinstance(earlier.get(suite), dict)]
        suites = tuple(suite for suite in suites if suite not in kept)
        if kept:
            print(f"{label}{', '.join(kept)}: finished earlier in {output} with the same model, settings and "
                  "options, not run again")
    options = {suite: record["suites"][suite] for suite in suites}
    # Suites finished earlier into this folder with these settings stay in its record and summary; this run's
    # suites are "running" until each finishes (one that fails leaves no claim on its folder's results).
    record["suites"] = {suite: kept for suite, kept in finished.items() if suite not in options}
    record["running"] = {**{suite: kept for suite, kept in interrupted.items() if suite not in options}, **options}
    summary.update({suite: earlier[suite] for suite in record["suites"] if suite in earlier})
    atomic_write_text(output / EVALUATION_RECORD, json.dumps(record, indent=2) + "\n")  # before any suite
    for suite in suites:
        bar, progress = _image_progress(f"{label}{suite}", args.quiet)
        if suite == "shapes":
            from nextstep.evaluation.shapes_geneval import run_shapes_geneval

            report = run_shapes_geneval(model, output / suite, images_per_tag=args.images_per_tag,
                                        settings=settings, progress=progress)
        elif suite == "emoji":
            from nextstep.evaluation.emoji_eval import HeldOutEmoji

            if (size, args.limit) not in prepared:
                prepared[size, args.limit] = HeldOutEmoji(size=size, limit=args.limit)
            report = prepared[size, args.limit](model, settings, output / suite, progress=progress)
        elif suite == "captioning":
            from nextstep.evaluation.shapes_captioning import run_shapes_captioning

            report = run_shapes_captioning(model, output / suite, scenes_per_group=args.scenes_per_group, size=size,
                                           seed=args.seed, batch_size=args.batch_size, progress=progress)
        else:
            from nextstep.evaluation.tokenizer_report import run_tokenizer_evaluation

            report = run_tokenizer_evaluation(model.image_tokenizer, output / suite, count=args.crops, size=size)
        bar.close()
        summary[suite] = report.to_dict()
        summary = _write_summary(output, summary)  # before the record names the suite finished
        record["suites"][suite] = record["running"].pop(suite)
        atomic_write_text(output / EVALUATION_RECORD, json.dumps(record, indent=2) + "\n")
        print(f"\n{SUITE_TITLES[suite]}\n{report.to_markdown()}")
    if not suites:  # every suite kept from an earlier run: the summary is written once here
        summary = _write_summary(output, summary)
    print(f"wrote {output}/summary.json, summary.md and one folder per suite")
    return summary


def _write_summary(output: Path, summary: dict) -> dict:
    """Write ``summary`` (the model, its settings and each finished suite's report) as ``summary.json`` and the
    suites' ``report.md`` files under one title as ``summary.md``, suites in `EVAL_SUITES` order; return it in
    that order."""
    from nextstep.evaluation.report_files import dumps_strict
    from nextstep.io import atomic_write_text

    summary = {key: summary[key] for key in ("model", "settings", *EVAL_SUITES) if key in summary}
    sections = [f"## {SUITE_TITLES[suite]}\n\n{(output / suite / 'report.md').read_text()}" for suite in EVAL_SUITES
                if suite in summary and (output / suite / "report.md").is_file()]
    atomic_write_text(output / "summary.json", dumps_strict(summary, indent=2) + "\n")  # undefined numbers: null
    atomic_write_text(output / "summary.md", f"# Evaluation of {summary['model']}\n\n" + "\n".join(sections))
    return summary


def _evaluation_record(model: str, settings: dict, suites: dict) -> dict:
    """What `nextstep eval` records: the model (its name and `model_fingerprint`), the sampling settings but
    their batch size (results do not depend on it), and each suite's options."""
    from nextstep.pretrained import model_fingerprint

    return {"model": model, "model_fingerprint": model_fingerprint(model),
            "settings": {k: v for k, v in settings.items() if k != "batch_size"}, "suites": suites}


def command_preference_pairs(args: argparse.Namespace) -> int:
    from nextstep.builders import load_model
    from nextstep.evaluation.self_judged_pairs import judge_function, read_prompt_file, write_self_judged_pairs

    judge = judge_function(args.judge)
    prompts = None if args.prompts is None else read_prompt_file(args.prompts)
    model = load_model(args.model, device=args.device, seed=args.seed)
    settings = _square_sampling_settings(model.config.generation, model.config.sampler, args)
    bar, progress = _image_progress("drawing", args.quiet)
    summary = write_self_judged_pairs(model, args.output, samples_per_prompt=args.samples_per_prompt,
                                      combinations=args.combinations, settings=settings, progress=progress,
                                      prompts=prompts, judge=judge)
    bar.close()
    print(f"wrote {args.output}: {summary.pairs:,} pairs from {summary.prompts_with_pairs} of {summary.prompts} "
          f"prompts ({summary.images:,} images, {summary.correct:.3f} judged correct)")
    return 0


def command_preference_rounds(args: argparse.Namespace) -> int:
    import logging

    from nextstep.evaluation.self_judged_pairs import judge_function, read_prompt_file
    from nextstep.training.preference_rounds import check_round_recipe, run_preference_rounds
    from nextstep.training.recipe import find_recipe, load_recipe, recipe_generation_defaults, recipe_sampler

    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    recipe = load_recipe(args.recipe, list(args.set or []))
    check_round_recipe(recipe)  # before loading anything
    judge = judge_function(args.judge)
    prompts = None if args.prompts is None else read_prompt_file(args.prompts)
    # From the start model's config: its weights load in the rounds.
    settings = _square_sampling_settings(recipe_generation_defaults(recipe), recipe_sampler(recipe), args)
    output = Path(args.output) if args.output else Path("outputs") / "preference-rounds" / find_recipe(args.recipe).stem
    records = run_preference_rounds(recipe, output, rounds=args.rounds, samples_per_prompt=args.samples_per_prompt,
                                    combinations=args.combinations, settings=settings, prompts=prompts, judge=judge,
                                    device=args.device, show_progress=not args.quiet)
    for record in records:
        print(f"round {record.round}: {record.pairs:,} pairs ({record.correct:.3f} of the start model's images "
              f"judged right), model {record.model}")
    print(f"wrote {output / 'rounds.json'}")
    return 0


def command_distill_head(args: argparse.Namespace) -> int:
    from nextstep.builders import load_model
    from nextstep.io import check_replaceable
    from nextstep.training.head_distillation import (
        HeadDistillationConfig,
        fit_distilled_head,
        install_distilled_head,
        record_for_distillation,
    )
    from nextstep.training.prompt_sets import prompt_set
    from nextstep.training.teacher_trajectories import TeacherTrajectories

    given = {name: getattr(args, name) for name in ("steps", "teacher_steps", "cfg", "images_per_prompt",
                                                    "condition_dtype", "objective", "iterations", "batch_size",
                                                    "learning_rate", "seed")}
    recording = None
    if args.recording is not None:
        drawing = [option for option, name in (("--prompts", "prompts"), ("--images-per-prompt", "images_per_prompt"),
                                               ("--cfg", "cfg"), ("--condition-dtype", "condition_dtype"),
                                               ("--save-recording", "save_recording"))
                   if getattr(args, name) is not None]
        if drawing:
            raise ValueError(f"--recording takes the teacher's images from {args.recording}; "
                             f"{', '.join(drawing)} would draw new ones (expected none of them, found them given)")
        recording = TeacherTrajectories.load(args.recording)
        given["steps"] = given["steps"] or recording.student_steps
        given["teacher_steps"] = given["teacher_steps"] or recording.teacher_steps
    config = HeadDistillationConfig(**{name: value for name, value in given.items() if value is not None})
    check_replaceable(Path(args.output))  # refused now, not after the teacher and the student ran
    prompts = None if recording is not None else [
        prompt for source in (args.prompts or ["shapes-seen", "emoji-train"]) for prompt in prompt_set(source)]
    model = load_model(args.model, device=args.device)
    if recording is None:
        bar, progress = _image_progress("teacher images", args.quiet)
        recording = record_for_distillation(model, prompts, config, progress=progress)
        bar.close()
        if args.save_recording is not None:
            recording.save(args.save_recording)
            print(f"wrote {args.save_recording}: {recording.num_tokens:,} recorded tokens")
    bar, progress = _image_progress("student steps", args.quiet, unit="step")
    distilled = fit_distilled_head(model, recording, config, progress=progress)
    bar.close()
    install_distilled_head(model, distilled)
    model.save_pretrained(args.output, extra_files={"distillation.json": json.dumps(distilled.report, indent=2) + "\n"})
    report = distilled.report
    held_out = (f"; held-out token RMSE to the teacher {report['student_rmse']:.4f} (the teacher at {config.steps} "
                f"steps {report['teacher_rmse_at_steps']:.4f}, token RMS {report['token_rms']:.3f})"
                if "student_rmse" in report else "")
    print(f"wrote {args.output}: {config.steps} Euler steps, no guidance branch "
          f"({report['head_evaluations_per_token']['student']} head evaluations per token, the teacher "
          f"{report['head_evaluations_per_token']['teacher']}){held_out}")
    return 0


def command_convert(args: argparse.Namespace) -> int:
    from nextstep.dtypes import DTYPES
    from nextstep.interop.convert import convert_checkpoint, parse_size

    result = convert_checkpoint(args.source, args.output, to=args.to,
                                dtype=DTYPES[args.dtype] if args.dtype else None,
                                max_shard_size=parse_size(args.max_shard_size), vae=args.vae,
                                head=args.head, seed=args.seed)
    print(f"wrote {args.output} ({result.source_layout} -> {result.target_layout}, "
          f"{_human(result.parameters)} parameters)")
    return 0


def command_replace_decoder(args: argparse.Namespace) -> int:
    from nextstep.builders import load_model
    from nextstep.image_decoder import replace_image_decoder
    from nextstep.io import check_replaceable

    check_replaceable(Path(args.output))  # before anything loads
    model = load_model(args.model)
    replace_image_decoder(model, _image_tokenizer_of(args.tokenizer))
    storage = {} if args.decoder_dtype == "float32" else {"image_tokenizer.decoder": getattr(torch, args.decoder_dtype)}
    model.save_pretrained(args.output, storage_dtypes=storage)
    print(f"wrote {args.output} (decoder of {args.tokenizer}, stored in {args.decoder_dtype})")
    return 0


def _image_tokenizer_of(source: str):
    """The VAE checkpoint ``source``, or the image tokenizer of the model it names (a saved model
    directory in the library's layout or a shipped model)."""
    from nextstep.builders import load_model
    from nextstep.interop.layout import NATIVE, detect_model_layout
    from nextstep.pretrained import model_directory
    from nextstep.tokenizers.vae_checkpoints import load_flux_vae

    directory = model_directory(source)
    if directory is not None and (directory / "config.json").is_file():
        try:
            is_model = detect_model_layout(directory) == NATIVE
        except ValueError:
            is_model = False
        if is_model:
            return load_model(str(directory)).image_tokenizer
    return load_flux_vae(source)


def command_add_word_aliases(args: argparse.Namespace) -> int:
    from nextstep.pretrained import model_directory
    from nextstep.tokenizers.word_aliases import sentence_encoder_aliases, write_model_with_aliases

    source = model_directory(args.model)
    if source is None:
        raise FileNotFoundError(f"expected a model directory or a shipped model at {args.model!r}, found nothing")
    aliases = write_model_with_aliases(source, args.output, sentence_encoder_aliases)
    print(f"wrote {args.output} ({len(aliases)} aliases)")
    return 0


def command_add_word_vectors(args: argparse.Namespace) -> int:
    from nextstep.builders import load_model
    from nextstep.io import check_replaceable
    from nextstep.tokenizers.word_vector_table import sentence_encoder_word_vectors

    check_replaceable(Path(args.output))  # before the sentence encoder loads
    model = sentence_encoder_word_vectors(load_model(args.model), dim=args.dim,
                                          substitution_probability=args.substitution_probability)
    model.save_pretrained(args.output)
    words = len(model.text_tokenizer.config.vector_words)
    print(f"wrote {args.output} ({words:,} further words, {args.dim} components per vector)")
    return 0


def _id_counts(tokenizer) -> str:
    further = tokenizer.input_vocab_size - tokenizer.vocab_size
    return f"{tokenizer.vocab_size:,} ids" + (f" + {further:,} read through word vectors" if further else "")


def _human(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.2f}{unit}"
    return str(count)


def import_modules(names: list[str]) -> None:
    """Import each module of ``names`` (with the current directory on the path) for its registrations."""
    import importlib
    import os

    if names and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for name in names:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name != name.split(".")[0] and error.name != name:
                raise
            hint = ""
            if name.endswith(".py") or "/" in name or os.sep in name:
                module = Path(name).with_suffix("").as_posix().replace("/", ".").lstrip(".")
                hint = f"; a module is named without its .py and with dots for folders: --import {module}"
            raise ModuleNotFoundError(f"--import {name}: expected an importable module, found none "
                                      f"(current directory {os.getcwd()}){hint}") from None


def build_parser() -> argparse.ArgumentParser:
    from nextstep.pretrained import DEFAULT_MODEL, bundled_models
    from nextstep.registry import model_names

    parser = argparse.ArgumentParser(prog="nextstep", description="NextStep-1 text-to-image models")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import a module first (repeatable), e.g. one that registers your own "
                             "sampler, head or dataset; the current directory is on the import path")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate images from prompts into PNG files")
    gen.add_argument("prompts", nargs="+", help="one or more prompts")
    gen.add_argument("--model", default=DEFAULT_MODEL,
                     help=f"a saved model directory, a shipped model {bundled_models()} or a preset "
                          f"{model_names()} (random weights); default {DEFAULT_MODEL}")
    gen.add_argument("--output", "-o", default="outputs", type=_output_folder, help="directory for the PNG files")
    gen.add_argument("--height", type=_positive_int, default=None,
                     help="pixels (default: the model's, or the --image's)")
    gen.add_argument("--width", type=_positive_int, default=None,
                     help="pixels (default: the model's, or the --image's)")
    gen.add_argument("--cfg", type=_scale, default=None, help="classifier-free guidance scale (default: the model's)")
    gen.add_argument("--cfg-schedule", default=None,
                     help="constant, linear_increasing or linear_decreasing (the release's 'linear'); "
                          "default: the model's")
    gen.add_argument("--steps", type=_positive_int, default=None, help="head steps per token (default: the model's)")
    gen.add_argument("--sampler", default=None, help="a registered sampler name (default: the model's)")
    gen.add_argument("--sampler-option", action="append", default=None, metavar="KEY=VALUE",
                     help="a field of the sampler's config (repeatable; the value read as JSON), e.g. "
                          "last_step_size=0 for euler_maruyama; the model's own sampler keeps its other settings")
    gen.add_argument("--temperature", type=_scale, default=1.0, help="scale of the sampling noise")
    gen.add_argument("--candidates", type=_positive_int, default=None,
                     help="samples per image, keeping the one the model scores highest against the prompt "
                          "(default: the model's)")
    gen.add_argument("--candidate-score", default=None,
                     help="what ranks the candidates: flow (how much the prompt lowers the head's loss on the "
                          "image), caption (the prompt's likelihood after the image) or a name added to "
                          "nextstep.reranking.CANDIDATE_SCORES; default: the model's")
    gen.add_argument("--shift", type=float, default=None,
                     help="time shift of the sampling grid (default 1.0, or 3.2 with --image)")
    gen.add_argument("--image", default=None, help="edit this image: the prompts are instructions")
    gen.add_argument("--cfg-img", type=_scale, default=None, help="image guidance scale for --image (2.0)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--negative-prompt", default=None,
                     help="unconditional text (default '', or 'Copy original image.' with --image)")
    gen.add_argument("--num-images", type=_positive_int, default=1, help="images per prompt")
    gen.add_argument("--device", default="cpu", type=_device)
    _add_token_sampler_option(gen)
    gen.add_argument("--grid", action="store_true", help="also write grid.png with every image")
    gen.add_argument("--overwrite", action="store_true",
                     help="replace images an earlier generation with other settings wrote there (refused otherwise)")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(handler=command_generate)

    caption = commands.add_parser("caption", help="caption images with the model's LM head")
    caption.add_argument("images", nargs="+", help="image files (sides multiples of 16 pixels)")
    caption.add_argument("--model", default=DEFAULT_MODEL,
                         help=f"a saved model directory, a shipped model or a preset (default {DEFAULT_MODEL})")
    caption.add_argument("--max-new-tokens", type=_positive_int, default=32, help="longest caption in tokens")
    caption.add_argument("--temperature", type=_scale, default=0.0,
                         help="0 (the default) writes the most probable caption; above 0 draws")
    caption.add_argument("--top-k", type=_positive_int, default=None, help="draw among the k most probable tokens")
    caption.add_argument("--top-p", type=float, default=None,
                         help="draw among the most probable tokens whose probabilities reach p")
    caption.add_argument("--seed", type=int, default=0)
    caption.add_argument("--device", default="cpu", type=_device)
    caption.set_defaults(handler=command_caption)

    info = commands.add_parser("info", help="components, parameter counts and config of a model")
    info.add_argument("model", help="a shipped model, a saved model directory or a preset name")
    info.add_argument("--config", action="store_true", help="also print the config as JSON")
    info.set_defaults(handler=command_info)

    for name, handler, what in (("train", command_train, "a model"),
                                ("train-tokenizer", command_train_tokenizer, "an image tokenizer")):
        train = commands.add_parser(name, help=f"train {what} from a recipe (resumes an existing run)")
        train.add_argument("recipe", help="a recipe JSON file or the name of one in recipes/")
        train.add_argument("--output", "-o", default=None, type=_output_folder,
                           help=f"run folder (default outputs/{name}/<recipe name>)")
        train.add_argument("--max-steps", type=_positive_int, default=None, help="override train.max_steps")
        train.add_argument("--set", action="append", metavar="KEY=VALUE",
                           help="override a recipe field, e.g. --set train.learning_rate=3e-4 (repeatable)")
        train.add_argument("--no-resume", action="store_true",
                           help="start over; what an earlier run left in the folder (checkpoints, logs, samples) "
                                "moves to earlier-runs/N/")
        train.add_argument("--quiet", action="store_true", help="no progress bar or info messages")
        train.set_defaults(handler=handler)

    evaluate = commands.add_parser(
        "eval-tokenizer", help="PSNR/SSIM on held-out photo crops, baselines, robustness, dispersion")
    evaluate.add_argument("tokenizer", help="a VAE checkpoint (file or directory, any layout) "
                                            "or a preset ('tiny', 'flux') with random weights")
    evaluate.add_argument("--output", "-o", default="outputs/eval-tokenizer", type=_output_folder,
                          help="the folder of the report files (default outputs/eval-tokenizer)")
    evaluate.add_argument("--count", type=_positive_int, default=256, help="number of crops")
    evaluate.add_argument("--size", type=_positive_int, default=64, help="crop side in pixels")
    evaluate.add_argument("--seed", type=int, default=1234,
                          help="seed of the crops (and of a preset's random weights); default 1234")
    evaluate.set_defaults(handler=command_eval_tokenizer)

    convert = commands.add_parser(
        "convert", help="convert between the release and native layouts, or start from Qwen2.5")
    convert.add_argument("source", help="a model directory: native, NextStep-1 release, or plain Qwen2")
    convert.add_argument("output", type=_output_folder, help="the directory to write (replaced atomically)")
    convert.add_argument("--to", choices=["native", "release"], default=None,
                         help="target layout (default: release -> native, native -> release, Qwen2 -> native)")
    convert.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                         help="parameter dtype of the written model (default: the source's)")
    convert.add_argument("--max-shard-size", default="5GiB",
                         help="largest shard of the release layout, e.g. 2GB or 2GiB (default 5GiB, as in Python)")
    convert.add_argument("--vae", default=None,
                         help="image tokenizer directory: for a Qwen2 source, or a release directory without vae/")
    convert.add_argument("--head", default="base", help="flow-head size for a Qwen2 source (tiny/small/base/large)")
    convert.add_argument("--seed", type=int, default=0, help="initialisation seed for a Qwen2 source")
    convert.set_defaults(handler=command_convert)

    replace = commands.add_parser(
        "replace-decoder", help="give a model the decoder of a tokenizer fine-tuned on the same latents")
    replace.add_argument("model", help="a saved model directory or a shipped model")
    replace.add_argument("tokenizer", help="a VAE checkpoint whose encoder is the model's (decoder-only fine-tune), "
                                           "or a model (directory or shipped) whose image tokenizer to take it from")
    replace.add_argument("output", type=_output_folder, help="the model directory to write (replaced atomically)")
    replace.add_argument("--decoder-dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                         help="how the decoder's weights are stored (loading casts them back; default float32)")
    replace.set_defaults(handler=command_replace_decoder)

    aliases = commands.add_parser(
        "add-word-aliases",
        help="let a word-tokenizer model read unknown words as their nearest known word")
    aliases.add_argument("model", help="a saved model directory or a shipped model")
    aliases.add_argument("output", type=_output_folder,
                         help="the model directory to write (replaced atomically; may be the model)")
    aliases.set_defaults(handler=command_add_word_aliases)

    vectors = commands.add_parser(
        "add-word-vectors",
        help="add pretrained word vectors to a word-tokenizer model, to train further")
    vectors.add_argument("model", help="a saved model directory or a shipped model")
    vectors.add_argument("output", type=_output_folder, help="the model directory to write (replaced atomically)")
    vectors.add_argument("--dim", type=_positive_int, default=64,
                         help="principal components kept per vector (default 64)")
    vectors.add_argument("--substitution-probability", type=float, default=0.2,
                         help="training rate of reading a known word as its nearest other word (default 0.2)")
    vectors.set_defaults(handler=command_add_word_vectors)

    evaluate = commands.add_parser(
        "eval", help="evaluate a model: shapes GenEval, held-out emoji, shapes captioning, tokenizer reconstruction")
    evaluate.add_argument("model", nargs="*", default=[DEFAULT_MODEL],
                          help="saved model directories, shipped models or presets (default "
                               f"{DEFAULT_MODEL}); several are evaluated one after another, each into a "
                               "folder of --output named after it, with a comparison table beside them")
    evaluate.add_argument("--suite", nargs="+", choices=EVAL_SUITES + ("all",), default=["all"])
    evaluate.add_argument("--output", "-o", default="outputs/eval", type=_output_folder)
    _add_sampling_options(evaluate)
    evaluate.add_argument("--images-per-tag", type=_positive_int, default=100,
                          help="shapes: images per GenEval category")
    evaluate.add_argument("--limit", type=_positive_int, default=None, help="emoji: first N held-out emoji only")
    evaluate.add_argument("--scenes-per-group", type=_positive_int, default=50,
                          help="captioning: scenes per kind and combination group")
    evaluate.add_argument("--crops", type=_positive_int, default=256, help="tokenizer: held-out photo crops")
    evaluate.add_argument("--overwrite", action="store_true",
                          help="replace the results of another model or settings there (refused otherwise)")
    evaluate.add_argument("--skip-finished", action="store_true",
                          help="do not run again a suite that the folder holds finished with the same model, "
                               "settings and options (rerun otherwise)")
    evaluate.add_argument("--device", default="cpu", type=_device)
    evaluate.add_argument("--quiet", action="store_true", help="no progress bars")
    evaluate.set_defaults(handler=command_eval)

    distill = commands.add_parser(
        "distill-head",
        help="distil the image head into a few-step head that holds the guidance (K Euler steps, one branch)")
    distill.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                         help=f"a saved model directory, a shipped model or a preset (default {DEFAULT_MODEL})")
    distill.add_argument("output", type=_output_folder, help="the model directory to write (replaced atomically), "
                                                             "with distillation.json")
    distill.add_argument("--prompts", action="append", metavar="SOURCE",
                         help="training prompts the teacher draws for: a prompt file (one per line, or .jsonl with "
                              "a 'prompt') or a set of nextstep.training.prompt_sets.PROMPT_SETS (repeatable; "
                              "default shapes-seen and emoji-train)")
    distill.add_argument("--steps", type=_positive_int, help="Euler steps of the student (default 4)")
    distill.add_argument("--teacher-steps", type=_positive_int,
                         help="steps of the teacher's own sampler, a multiple of --steps (default 20)")
    distill.add_argument("--cfg", type=_scale, default=None, help="the teacher's guidance (default: the model's)")
    distill.add_argument("--images-per-prompt", type=_positive_int, help="teacher images per prompt (default 1)")
    distill.add_argument("--condition-dtype", choices=("float32", "bfloat16", "float16"),
                         help="dtype the teacher's recorded conditions are kept in (default float32)")
    distill.add_argument("--objective", choices=("segments", "rollout"),
                         help="fit each segment at the teacher's state, or the student's own steps from the noise "
                              "to the teacher's states (default segments)")
    distill.add_argument("--iterations", type=_positive_int, help="student optimiser steps (default 4000)")
    distill.add_argument("--batch-size", type=_positive_int, help="token segments per step (default 1024)")
    distill.add_argument("--learning-rate", type=float, help="peak learning rate (default 0.0003)")
    distill.add_argument("--seed", type=int, help="seed of the teacher's images and the student's draws (default 0)")
    distill.add_argument("--save-recording", metavar="FILE",
                         help="also write the teacher's recording (.safetensors), to fit other students to later")
    distill.add_argument("--recording", metavar="FILE",
                         help="fit to a recording written by --save-recording instead of drawing teacher images "
                              "(its steps and teacher steps unless given)")
    distill.add_argument("--device", default="cpu", type=_device)
    distill.add_argument("--quiet", action="store_true", help="no progress bars")
    distill.set_defaults(handler=command_distill_head)

    pairs = commands.add_parser(
        "preference-pairs",
        help="draw images with a model, judge them and write wrong/right pairs for preference training")
    pairs.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                       help=f"a saved model directory, a shipped model or a preset (default {DEFAULT_MODEL})")
    pairs.add_argument("output", type=_output_folder,
                       help="the folder to write: images/, pairs.jsonl (a preference_manifest), summary.json "
                            "(earlier pairs there are replaced whole; a folder of other files is refused)")
    _add_judging_options(pairs)
    _add_sampling_options(pairs)
    pairs.add_argument("--device", default="cpu", type=_device)
    pairs.add_argument("--quiet", action="store_true", help="no progress bar")
    pairs.set_defaults(handler=command_preference_pairs)

    rounds = commands.add_parser(
        "preference-rounds",
        help="rounds of drawing, judging and preference training, each from the previous round's model")
    rounds.add_argument("recipe", help="a preference recipe on one preference_manifest dataset (a JSON file or "
                                       "the name of one in recipes/); its model starts round 1")
    rounds.add_argument("--rounds", type=_positive_int, required=True, help="how many rounds")
    rounds.add_argument("--output", "-o", default=None, type=_output_folder,
                        help="folder of round1/, round2/, ... and rounds.json "
                             "(default outputs/preference-rounds/<recipe name>)")
    rounds.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a recipe field, e.g. --set train.max_steps=200 (repeatable)")
    _add_judging_options(rounds)
    _add_sampling_options(rounds)
    rounds.add_argument("--device", default="cpu", type=_device, help="where the images are drawn")
    rounds.add_argument("--quiet", action="store_true", help="no progress bars or info messages")
    rounds.set_defaults(handler=command_preference_rounds)
    for command in commands.choices.values():  # before or after the command's name alike
        command.add_argument("--import", dest="command_imports", action="append", default=[], metavar="MODULE",
                             help="import a module first (repeatable), as nextstep --import MODULE does")
    return parser


def _add_judging_options(parser: argparse.ArgumentParser) -> None:
    """What is drawn and how it is judged, for `write_self_judged_pairs`."""
    parser.add_argument("--samples-per-prompt", type=_positive_int, default=16,
                        help="images drawn per prompt (>= 2; default 16)")
    parser.add_argument("--combinations", choices=("seen", "held_out", "all"), default="seen",
                        help="which shapes GenEval prompts: training's combinations (the default), held-out "
                             "ones or all")
    parser.add_argument("--prompts", default=None, metavar="FILE",
                        help="prompts of your own instead: one per line, or a .jsonl file of objects with "
                             "a 'prompt' (other keys reach the judge)")
    parser.add_argument("--judge", default="shapes",
                        help="a name in nextstep.evaluation.self_judged_pairs.JUDGES (default shapes: the exact "
                             "detector and GenEval's rule, for the shapes GenEval prompts)")


def _add_sampling_options(parser: argparse.ArgumentParser) -> None:
    """The options `_square_sampling_settings` reads: size, guidance, steps, sampler, candidates, seed, batch."""
    parser.add_argument("--size", type=_positive_int, default=None,
                        help="image side in pixels (default: the model's, when square)")
    parser.add_argument("--cfg", type=_scale, default=None,
                        help="classifier-free guidance scale (default: the model's)")
    parser.add_argument("--cfg-schedule", default=None,
                        help="constant, linear_increasing or linear_decreasing (default: the model's)")
    parser.add_argument("--steps", type=_positive_int, default=None,
                        help="head steps per token (default: the model's)")
    parser.add_argument("--sampler", default=None, help="a registered sampler name (default: the model's)")
    parser.add_argument("--sampler-option", action="append", default=None, metavar="KEY=VALUE",
                        help="set a field of the sampler's config, the value read as JSON, else as text "
                             "(repeatable; the model's own sampler keeps its other settings)")
    parser.add_argument("--temperature", type=_scale, default=1.0, help="scale of the sampling noise")
    parser.add_argument("--candidates", type=_positive_int, default=None,
                        help="samples per image, the model keeping the best (default: the model's)")
    parser.add_argument("--candidate-score", default=None,
                        help="what ranks the candidates: flow, caption or a name added to "
                             "nextstep.reranking.CANDIDATE_SCORES (default: the model's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of image 0; image i uses seed + i")
    parser.add_argument("--batch-size", type=_positive_int, default=32)
    _add_token_sampler_option(parser)


def _add_token_sampler_option(parser: argparse.ArgumentParser) -> None:
    from nextstep.fast.token_sampler import TOKEN_SAMPLERS

    parser.add_argument("--token-sampler", default="loop", choices=TOKEN_SAMPLERS,
                        help="how the tokens are sampled after the prefill: loop (the plain loop), fast (captured "
                             "CUDA graphs and fused kernels on a GPU, the same tokens up to rounding), fused (and the "
                             "fused decode step), skinny (and its few-rows products), int8 (and int8 decode "
                             "weights: half the bytes read per token, images close to the model's)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        import_modules(args.imports + args.command_imports)
        return args.handler(args)
    except (ValueError, OSError, ImportError) as error:  # bad input, missing or unusable files or packages
        print(f"nextstep {args.command}: error: {error}", file=sys.stderr)
        return 2
    except FloatingPointError as error:  # a run that diverged: its message says what to change
        print(f"nextstep {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # what was written is whole: every write is atomic
        print(f"nextstep {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
