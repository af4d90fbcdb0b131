"""GenEval on the shapes world: the six GenEval categories, held-out prompts, an exact detector.

Prompts are written in GenEval's metadata format (``tag``, ``prompt``,
``include`` and ``exclude`` requirements with ``class``, ``count``, ``color``
and ``position``) and scored by GenEval's rule: for every ``include`` entry the
``count`` best detections of its class must exist, have its colour, and stand in
its relation to every detection matched by the entry it refers to (GenEval's box
rule, `nextstep.training.data.shapes.relations.box_relations`); no ``exclude``
entry may be met. The per-category score is the share of correct
images; the overall score is the mean of the six categories.

Only held-out combinations are prompted
(`nextstep.training.data.shapes.combinations`); ``single_object`` has none and
uses its three prompts.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from nextstep.config import is_count, require, require_count
from nextstep.evaluation.report_files import write_report_files
from nextstep.evaluation.sampling import SamplingSettings, generate_images
from nextstep.evaluation.shapes_detector import Detection, DetectorConfig, detect_shapes
from nextstep.training.data.shapes.combinations import (
    COMBINATION_MODES,
    GENEVAL_TAGS,
    all_keys,
    combination_key,
    held_out_keys,
    in_combinations,
)
from nextstep.training.data.shapes.relations import box_relations
from nextstep.training.data.shapes.render import render_scene
from nextstep.training.data.shapes.world import (
    count_phrase,
    position_phrase,
    sample_scene,
    shape_phrase,
)

if TYPE_CHECKING:
    from nextstep.model import NextStep


def geneval_entry(tag: str, key: tuple) -> dict:
    """The GenEval metadata of the prompt for combination ``key`` of ``tag``."""
    if tag == "single_object":
        (shape,) = key
        return {"tag": tag, "prompt": shape_phrase(shape), "include": [{"class": shape, "count": 1}]}
    if tag == "two_object":
        first, second = key
        return {"tag": tag, "prompt": f"{shape_phrase(first)} and {shape_phrase(second)}",
                "include": [{"class": first, "count": 1}, {"class": second, "count": 1}]}
    if tag == "counting":
        count, shape = key
        return {"tag": tag, "prompt": count_phrase(count, shape),
                "include": [{"class": shape, "count": count}], "exclude": [{"class": shape, "count": count + 1}]}
    if tag == "colors":
        colour, shape = key
        return {"tag": tag, "prompt": shape_phrase(shape, colour),
                "include": [{"class": shape, "count": 1, "color": colour}]}
    if tag == "position":
        subject, relation, reference = key
        return {"tag": tag, "prompt": position_phrase(shape_phrase(subject), relation, shape_phrase(reference)),
                "include": [{"class": reference, "count": 1},
                            {"class": subject, "count": 1, "position": [relation, 0]}]}
    if tag == "color_attr":
        first_colour, first, second_colour, second = key
        return {"tag": tag, "prompt": f"{shape_phrase(first, first_colour)} and {shape_phrase(second, second_colour)}",
                "include": [{"class": first, "count": 1, "color": first_colour},
                            {"class": second, "count": 1, "color": second_colour}]}
    raise ValueError(f"tag must be one of {list(GENEVAL_TAGS)}, found {tag!r}")


def geneval_prompts(combinations: str = "held_out") -> list[dict]:
    """GenEval metadata of every prompt of ``combinations``, tag by tag.

    Args:
        combinations: ``held_out`` (the prompts training never sees; the
            evaluation's), ``seen`` (training's own combinations, for choosing
            sampling settings without looking at held-out prompts) or ``all``.
            ``single_object`` holds nothing out and always gives its three prompts.
    """
    require(combinations in COMBINATION_MODES, "combinations", combinations, f"one of {list(COMBINATION_MODES)}")
    entries = []
    for tag in GENEVAL_TAGS:
        mode = combinations if held_out_keys(tag) else "all"  # single_object: its three prompts always
        entries.extend(geneval_entry(tag, key) for key in all_keys(tag) if in_combinations(tag, key, mode))
    return entries


def score_image(detections: list[Detection], entry: dict) -> tuple[bool, str]:
    """Whether ``detections`` satisfy GenEval ``entry``, and the first reason they do not."""
    by_class: dict[str, list[Detection]] = defaultdict(list)
    for detection in sorted(detections, key=lambda d: -d.score):
        by_class[detection.shape].append(detection)
    matched_groups: list[list[Detection] | None] = []
    correct, reason = True, ""
    for requirement in entry.get("include", []):
        shape, count = requirement["class"], requirement["count"]
        found = by_class[shape][:count]
        ok = len(found) >= count
        if not ok:
            reason = reason or f"expected {count} {shape}, found {len(by_class[shape])}"
        elif "color" in requirement and sum(d.colour == requirement["color"] for d in found) < count:
            ok = False
            reason = reason or f"expected {requirement['color']} {shape}, found {[d.colour for d in found]}"
        elif "position" in requirement:
            relation, target = requirement["position"]
            targets = matched_groups[target]
            if targets is None:
                ok = False
                reason = reason or f"no {entry['include'][target]['class']} to be {relation}"
            elif not all(relation in box_relations(d.box, t.box) for d in found for t in targets):
                ok = False
                reason = reason or f"{shape} is not {relation} the {entry['include'][target]['class']}"
        correct = correct and ok
        matched_groups.append(found if ok else None)
    for requirement in entry.get("exclude", []):
        shape, count = requirement["class"], requirement["count"]
        if len(by_class[shape]) >= count:
            correct = False
            reason = reason or f"expected fewer than {count} {shape}, found {len(by_class[shape])}"
    return correct, reason


@dataclass
class GenEvalReport:
    """Scores of one shapes GenEval run.

    Attributes:
        overall: mean of the per-category scores.
        per_tag: share of correct images per category.
        images_per_tag: images scored per category.
        settings: the sampling settings.
        tokenizer_ceiling: per category, the score of ground truth of the same combinations, at the same
            size, through the image tokenizer.
        combinations: which prompts were scored (`geneval_prompts`).
        empty: per category, the share of images in which the detector found no object at all
            (a model that leaves the canvas blank, rather than drawing the wrong thing).
    """

    overall: float
    per_tag: dict[str, float]
    images_per_tag: dict[str, int]
    settings: dict = field(default_factory=dict)
    tokenizer_ceiling: dict[str, float] = field(default_factory=dict)
    combinations: str = "held_out"
    empty: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_markdown(self) -> str:
        ceiling, empty = self.tokenizer_ceiling, self.empty
        lines = ["| category | score | images |" + (" empty |" if empty else "")
                 + (" tokenizer ceiling |" if ceiling else ""),
                 "|---|---|---|" + ("---|" if empty else "") + ("---|" if ceiling else "")]
        for tag, value in self.per_tag.items():
            extra = (f" {empty[tag]:.2f} |" if empty else "") + (f" {ceiling[tag]:.3f} |" if ceiling else "")
            lines.append(f"| {tag} | {value:.3f} | {self.images_per_tag[tag]} |{extra}")
        extra = (f" {sum(empty.values()) / len(empty):.2f} |" if empty else "") + (
            f" **{sum(ceiling.values()) / len(ceiling):.3f}** |" if ceiling else "")
        lines.append(f"| **overall** | **{self.overall:.3f}** | {sum(self.images_per_tag.values())} |{extra}")
        return "\n".join(lines)


@torch.no_grad()
def tokenizer_ceiling(model: "NextStep", images_per_tag: int = 48, size: int | tuple[int, int] = 64,
                      detector: DetectorConfig | None = None, *, combinations: str = "held_out") -> dict[str, float]:
    """The score of ground truth passed through the model's image tokenizer, per category.

    For every category, ``images_per_tag`` scenes of ``combinations`` (as in
    `geneval_prompts`: any combination for ``single_object``) are rendered at
    ``size`` pixels (one side, or (height, width)), encoded and decoded by
    ``model.image_tokenizer``, and scored like generated images against their
    own prompts: what a model with perfect token predictions would score, so
    the part of a shortfall that is the tokenizer's.

    Raises:
        ValueError: ``images_per_tag`` below 1, a size that is not one or two
            positive integers, or unknown ``combinations``.
    """
    from nextstep.evaluation.tokenizer_eval import reconstruct
    from nextstep.images import from_pil, to_pil

    require_count("images_per_tag", images_per_tag)
    require(combinations in COMBINATION_MODES, "combinations", combinations, f"one of {list(COMBINATION_MODES)}")
    height, width = _height_width(size)
    tokenizer = model.image_tokenizer
    reference = next(tokenizer.parameters(), torch.empty(0))
    ceiling = {}
    for tag in GENEVAL_TAGS:
        mode = combinations if held_out_keys(tag) else "all"  # single_object: its three prompts always
        scenes = [sample_scene(random.Random(f"ceiling:{tag}:{i}"), tag, combinations=mode)
                  for i in range(images_per_tag)]
        images = from_pil([render_scene(scene, width, height) for scene in scenes])  # (B, 3, height, width)
        decoded, _ = reconstruct(tokenizer, images.to(reference.device, reference.dtype))
        decoded = decoded.cpu()
        scores = [score_image(detect_shapes(image, detector), geneval_entry(tag, combination_key(scene)))[0]
                  for scene, image in zip(scenes, to_pil(decoded))]
        ceiling[tag] = sum(scores) / len(scores)
    return ceiling


def _height_width(size: object) -> tuple[int, int]:
    """(height, width) of a size given as one side or as (height, width)."""
    sides = (size, size) if not isinstance(size, (tuple, list)) else tuple(size)
    require(len(sides) == 2 and all(is_count(side) for side in sides), "size", size,
            "a positive integer or (height, width) of positive integers")
    return sides


def run_shapes_geneval(model: "NextStep", output: Path | None = None, *, images_per_tag: int = 48,
                       settings: SamplingSettings | None = None, detector: DetectorConfig | None = None,
                       progress: Callable[[int, int], None] | None = None,
                       with_ceiling: bool = True, combinations: str = "held_out") -> GenEvalReport:
    """Generate ``images_per_tag`` images per category (cycling its prompts), detect and score them.

    ``combinations`` picks the prompts (`geneval_prompts`): the held-out ones by
    default; ``seen`` scores training's own combinations, the place to choose
    sampling settings. ``settings`` default to the model's own (`SamplingSettings.from_defaults` of its
    generation block), as `nextstep eval` draws.

    With ``with_ceiling`` the report also holds `tokenizer_ceiling` for as many
    ground-truth scenes per category, of the same ``combinations`` and at the
    settings' height and width.

    With ``output`` it writes ``results.jsonl`` (one line per image), ``report.json``,
    ``report.md`` and ``samples.png`` (a row of eight images per category).

    Raises:
        ValueError: ``images_per_tag`` below 1 or unknown ``combinations``, before anything is generated.
    """
    from nextstep.images import image_grid
    from nextstep.io import atomic_path

    require_count("images_per_tag", images_per_tag)
    settings = settings or SamplingSettings.from_defaults(model.config.generation)
    by_tag: dict[str, list[dict]] = defaultdict(list)
    for entry in geneval_prompts(combinations):
        by_tag[entry["tag"]].append(entry)
    plan = [(tag, by_tag[tag][i % len(by_tag[tag])]) for tag in GENEVAL_TAGS for i in range(images_per_tag)]
    images = generate_images(model, [entry["prompt"] for _, entry in plan], settings, progress)
    results, correct_by_tag, empty_by_tag = [], defaultdict(list), defaultdict(list)
    for index, ((tag, entry), image) in enumerate(zip(plan, images)):
        detections = detect_shapes(image, detector)
        correct, reason = score_image(detections, entry)
        correct_by_tag[tag].append(correct)
        empty_by_tag[tag].append(not detections)
        results.append({"index": index, "tag": tag, "prompt": entry["prompt"], "correct": correct,
                        "reason": reason, "detections": [
                            {"shape": d.shape, "colour": d.colour, "center": list(d.center), "box": list(d.box),
                             "score": round(d.score, 4)} for d in detections]})
    per_tag = {tag: sum(v) / len(v) for tag, v in correct_by_tag.items()}
    report = GenEvalReport(overall=sum(per_tag.values()) / len(per_tag), per_tag=per_tag,
                           images_per_tag={tag: len(v) for tag, v in correct_by_tag.items()},
                           settings=settings.to_dict(),
                           tokenizer_ceiling=tokenizer_ceiling(model, images_per_tag, (settings.height, settings.width),
                                                             detector, combinations=combinations)
                           if with_ceiling else {}, combinations=combinations,
                           empty={tag: sum(v) / len(v) for tag, v in empty_by_tag.items()})
    if output is not None:
        output = write_report_files(output, report, results)
        per_tag = min(8, images_per_tag)
        shown = [images[t * images_per_tag + i] for t in range(len(GENEVAL_TAGS)) for i in range(per_tag)]
        with atomic_path(output / "samples.png") as tmp:
            image_grid(shown, columns=per_tag).save(tmp, format="PNG")
    return report
