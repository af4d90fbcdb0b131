"""Preference pairs from a model's own samples, judged right or wrong.

For every prompt the model draws K images (fixed seeds,
`nextstep.evaluation.sampling.generate_images`); a judge splits them into
right and wrong ones, and every wrong image becomes the rejected side of a pair
whose preferred side is a right image of the same prompt (taken in turn).
Prompts whose K images are all right, or all wrong, give no pair. The pairs
are written as a `preference_manifest` folder: PNG files and ``pairs.jsonl``,
plus ``summary.json``.

By default the prompts are the shapes GenEval prompts of the chosen
combinations and the judge is the exact detector with GenEval's rule
(`shapes_judge`); any prompts and any ``judge(image, entry) -> bool`` can take
their place (a classifier, a reward model, a person's labels).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from nextstep.evaluation.report_files import dumps_strict
from nextstep.evaluation.sampling import SamplingSettings, generate_images
from nextstep.evaluation.shapes_detector import detect_shapes
from nextstep.evaluation.shapes_geneval import geneval_prompts, score_image
from nextstep.io import atomic_directory, check_replaceable, what_is_at
from nextstep.training.data.manifest import manifest_entries

if TYPE_CHECKING:
    from PIL import Image

    from nextstep.model import NextStep

Judge = Callable[["Image.Image", dict], bool]
"""Whether an image is right for its prompt entry (a dict with at least ``prompt``)."""


def shapes_judge(image: "Image.Image", entry: dict) -> bool:
    """The default judge: the exact shapes detector and GenEval's rule for a GenEval ``entry``."""
    return score_image(detect_shapes(image), entry)[0]


JUDGES: dict[str, Judge] = {"shapes": shapes_judge}
"""Judges by name, for ``nextstep preference-pairs --judge NAME``; add your own
(a module that adds one is loaded with ``nextstep --import MODULE``)."""


def judge_function(name: str) -> Judge:
    """The judge called ``name`` in `JUDGES`.

    Raises:
        ValueError: an unknown name, listing the known ones.
    """
    if name not in JUDGES:
        raise ValueError(f"judge must be one of {sorted(JUDGES)}, found {name!r}")
    return JUDGES[name]


def read_prompt_file(path: str | Path) -> list[str | dict]:
    """Prompts from a file: a ``.jsonl`` file holds one JSON object with a string
    ``prompt`` per line (other keys reach the judge); any other file one prompt per
    line. Blank lines are skipped.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: a bad JSONL line (naming the line), or a file with no prompt.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"expected a prompt file at {path}, found {what_is_at(path)}")
    if path.suffix == ".jsonl":
        prompts: list[str | dict] = [entry for _, entry in manifest_entries(path, required=("prompt",))]
    else:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompt: expected one per line")
    return prompts


@dataclass
class SelfJudgedSummary:
    """What `write_self_judged_pairs` drew and kept.

    Attributes:
        prompts: prompts sampled.
        images: images drawn (prompts x samples per prompt).
        correct: share of the images judged correct.
        pairs: preference pairs written.
        prompts_with_pairs: prompts that gave at least one pair.
        settings: how the images were drawn.
    """

    prompts: int
    images: int
    correct: float
    pairs: int
    prompts_with_pairs: int
    settings: dict


#: Files whose presence marks a folder as earlier pairs, which a new draw may replace whole.
PAIRS_MARKERS = ("pairs.jsonl", "summary.json")


def write_self_judged_pairs(model: "NextStep", output: str | Path, *, samples_per_prompt: int = 8,
                            combinations: str = "seen", settings: SamplingSettings | None = None,
                            progress: Callable[[int, int], None] | None = None,
                            prompts: Sequence[str | dict] | None = None,
                            judge: Judge | None = None) -> SelfJudgedSummary:
    """Draw ``samples_per_prompt`` images per prompt, judge them and write the pairs into ``output``.

    Args:
        model: the model whose samples are judged.
        output: the folder to write (``images/``, ``pairs.jsonl``, ``summary.json``), as one unit: an
            earlier output there is replaced whole; a folder of other files is refused.
        samples_per_prompt: K, images per prompt.
        combinations: which shapes GenEval prompts when ``prompts`` is None
            (`nextstep.evaluation.shapes_geneval.geneval_prompts`): ``seen`` by
            default, so that held-out prompts stay unseen.
        settings: how to sample (default: `SamplingSettings` at the model's own guidance,
            steps and size).
        progress: called with (images done, images in all).
        prompts: prompts of your own, as strings or as dicts with a ``prompt``
            key and whatever else the judge reads (default: the shapes GenEval prompts).
        judge: ``judge(image, entry) -> bool``, True for a right image (default
            `shapes_judge`, which reads GenEval entries only).

    Raises:
        ValueError: ``samples_per_prompt`` below 2 (a pair needs two images), no
            prompt, a prompt that is neither a string nor a dict with a string ``prompt``, or
            the shapes judge with prompts that are not GenEval entries (before
            anything is drawn).
    """
    if isinstance(samples_per_prompt, bool) or not isinstance(samples_per_prompt, int) or samples_per_prompt < 2:
        raise ValueError(f"samples_per_prompt must be an integer >= 2, found {samples_per_prompt!r}")
    if settings is None:
        settings = SamplingSettings.from_defaults(model.config.generation, batch_size=32)
    entries = geneval_prompts(combinations) if prompts is None else [_entry(prompt) for prompt in prompts]
    if not entries:
        raise ValueError("prompts must hold at least one prompt, found none")
    judge = shapes_judge if judge is None else judge
    if judge is shapes_judge:
        for entry in entries:
            if not isinstance(entry.get("include"), list):
                raise ValueError(f"the shapes judge reads GenEval entries (with an 'include' list), found {entry!r}: "
                                 "give a judge of your own for prompts of your own")
    check_replaceable(Path(output), PAIRS_MARKERS)  # a folder of other files is refused before anything is drawn
    plan = [entry for entry in entries for _ in range(samples_per_prompt)]
    images = generate_images(model, [entry["prompt"] for entry in plan], settings, progress)
    verdicts: dict[int, dict[bool, list[int]]] = defaultdict(lambda: {True: [], False: []})
    for index, (entry, image) in enumerate(zip(plan, images)):
        verdicts[index // samples_per_prompt][bool(judge(image, entry))].append(index)
    lines, used = [], set()
    paired = set()
    for number, split in sorted(verdicts.items()):
        good, bad = split[True], split[False]
        if not good or not bad:
            continue
        paired.add(number)
        for turn, rejected in enumerate(bad):
            chosen = good[turn % len(good)]
            used.update((chosen, rejected))
            lines.append({"caption": entries[number]["prompt"], "chosen": f"images/{chosen:06d}.png",
                          "rejected": f"images/{rejected:06d}.png"})
    correct = sum(len(split[True]) for split in verdicts.values())
    summary = SelfJudgedSummary(prompts=len(entries), images=len(plan), correct=correct / len(plan),
                                pairs=len(lines), prompts_with_pairs=len(paired),
                                settings=settings.to_dict())
    # The folder as one unit: an earlier one is replaced whole (no stale images), and a crash leaves it as it was.
    with atomic_directory(Path(output), markers=PAIRS_MARKERS) as staging:
        (staging / "images").mkdir()
        for index in sorted(used):
            images[index].save(staging / "images" / f"{index:06d}.png", format="PNG")
        (staging / "pairs.jsonl").write_text("".join(dumps_strict(line) + "\n" for line in lines))
        (staging / "summary.json").write_text(dumps_strict(asdict(summary), indent=2) + "\n")
    return summary


def _entry(prompt: str | dict) -> dict:
    if isinstance(prompt, str):
        return {"prompt": prompt}
    if isinstance(prompt, dict) and isinstance(prompt.get("prompt"), str):
        return prompt
    raise ValueError(f"each prompt must be a string or a dict with a string 'prompt', found {prompt!r}")
