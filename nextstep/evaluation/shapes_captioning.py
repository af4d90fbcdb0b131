"""Captioning on the shapes world: does the caption the model writes for an image state what it shows?

The model reads a rendered scene image-first and writes until ``<|endoftext|>``
(`nextstep.text_generation.caption_images`, greedy). A caption is **correct**
when it is one of the scene's true captions
(`nextstep.training.data.shapes.captions.true_captions`): a complete
statement, in the world's caption grammar, of every object the scene holds.
An image admits several (``"a circle"`` and ``"a red circle"``; ``"a circle and
a square"`` in either order; a relation in either direction), so the score does
not ask for the one caption the scene was drawn with (that share is reported as
``exact``). Relations are judged by GenEval's box rule on the drawn boxes, as
in `nextstep.evaluation.shapes_geneval`.

Scenes of every kind are drawn twice: from training's combinations (``seen``)
and from the held-out ones (``held_out``; kinds without held-out combinations
only once), so a held-out score asks for a caption that training never wrote.
``grammatical`` is the share of captions the grammar can produce at all.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from nextstep.config import require_count
from nextstep.evaluation.report_files import write_report_files
from nextstep.training.data.shapes.captions import grammar_captions, true_captions
from nextstep.training.data.shapes.combinations import held_out_keys, tag_of
from nextstep.training.data.shapes.metadata import SCENE_KINDS, Scene
from nextstep.training.data.shapes.render import render_scene
from nextstep.training.data.shapes.world import sample_scene

if TYPE_CHECKING:
    from nextstep.model import NextStep


def caption_scenes(kinds: tuple[str, ...] = SCENE_KINDS, scenes_per_group: int = 32,
                   seed: int = 0) -> list[tuple[str, str, Scene]]:
    """(kind, combinations, scene) for ``scenes_per_group`` scenes of each kind from training's
    combinations (``seen``) and, where the kind has any, from the held-out ones."""
    plan = []
    for kind in kinds:
        groups = ("seen", "held_out") if held_out_keys(tag_of(kind)) else ("seen",)
        for combinations in groups:
            for index in range(scenes_per_group):
                rng = random.Random(f"captioning:{seed}:{kind}:{combinations}:{index}")
                plan.append((kind, combinations, sample_scene(rng, kind, combinations=combinations)))
    return plan


@dataclass
class CaptioningReport:
    """Scores of one shapes-captioning run.

    Attributes:
        seen: share of correct captions over scenes of training's combinations (all kinds).
        held_out: the same over scenes of held-out combinations.
        per_group: ``"kind/combinations"`` -> share of correct captions.
        grammatical: share of captions the world's grammar can write.
        exact: share of captions equal to the one the scene was drawn with.
        scenes: captions scored.
        settings: how the captions were written.
    """

    seen: float
    held_out: float
    per_group: dict[str, float]
    grammatical: float
    exact: float
    scenes: int
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_markdown(self) -> str:
        lines = ["| scenes | correct |", "|---|---|"]
        lines += [f"| {group} | {value:.3f} |" for group, value in self.per_group.items()]
        lines += [f"| **seen combinations** | **{self.seen:.3f}** |",
                  f"| **held-out combinations** | **{self.held_out:.3f}** |",
                  "", f"{self.scenes} scenes; grammatical {self.grammatical:.3f}, "
                  f"the scene's own caption {self.exact:.3f}."]
        return "\n".join(lines)


def run_shapes_captioning(model: "NextStep", output: Path | None = None, *, scenes_per_group: int = 32,
                          size: int = 64, seed: int = 0, batch_size: int = 64, max_new_tokens: int = 16,
                          progress: Callable[[int, int], None] | None = None) -> CaptioningReport:
    """Caption rendered scenes greedily and score them against `true_captions`.

    With ``output`` it writes ``results.jsonl`` (one line per scene),
    ``report.json`` and ``report.md``.

    Raises:
        ValueError: ``scenes_per_group`` or ``batch_size`` below 1, before anything is captioned.
    """
    from nextstep.text_generation import caption_images

    require_count("scenes_per_group", scenes_per_group)
    require_count("batch_size", batch_size)

    plan = caption_scenes(SCENE_KINDS, scenes_per_group, seed)
    captions: list[str] = []
    for start in range(0, len(plan), batch_size):
        images = [render_scene(scene, size, size) for _, _, scene in plan[start:start + batch_size]]
        # Scene i is read from seed + i (a tokenizer that samples its latents), whatever the batch size.
        captions += caption_images(model, images, max_new_tokens=max_new_tokens, seed=seed + start).texts
        if progress is not None:
            progress(len(captions), len(plan))
    grammar = grammar_captions()
    results, by_group, by_combinations = [], defaultdict(list), defaultdict(list)
    for (kind, combinations, scene), caption in zip(plan, captions):
        correct = caption in true_captions(scene)
        by_group[f"{kind}/{combinations}"].append(correct)
        by_combinations[combinations].append(correct)
        results.append({"kind": kind, "combinations": combinations, "scene_caption": scene.caption,
                        "caption": caption, "correct": correct, "grammatical": caption in grammar})

    def share(values) -> float:  # of no caption: undefined (null in the JSON), not 0
        return sum(values) / len(values) if values else float("nan")

    report = CaptioningReport(
        seen=share(by_combinations["seen"]), held_out=share(by_combinations["held_out"]),
        per_group={group: share(values) for group, values in by_group.items()},
        grammatical=share([r["grammatical"] for r in results]),
        exact=share([r["caption"] == r["scene_caption"] for r in results]), scenes=len(results),
        settings={"size": size, "seed": seed, "scenes_per_group": scenes_per_group, "decoding": "greedy",
                  "max_new_tokens": max_new_tokens})
    if output is not None:
        write_report_files(output, report, results)
    return report
