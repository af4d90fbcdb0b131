"""Rounds of preference training on a model's own samples.

Round ``r`` draws images with the model of round ``r - 1`` (the recipe's
``model`` for round 1), built as its training builds it (`build_recipe_model`:
``model_seed``, ``model_arguments``, ``image_tokenizer`` and ``training_settings``
apply), judges them and writes the pairs
(`nextstep.evaluation.self_judged_pairs.write_self_judged_pairs`) into
``OUTPUT/round{r}/pairs``, then trains the recipe from that model on those
pairs into ``OUTPUT/round{r}`` (its ``model/`` is the next round's start, and
also the reference of its own DPO loss). Round ``r`` trains with the recipe's
``train.seed + r - 1``. A round whose model exists is kept, pairs whose
``summary.json`` exists are reused and an interrupted training resumes from its
checkpoint (or starts over without one), so running the same call again
continues where it stopped; a kept round made by another recipe, or pairs
drawn from another start (``round{r}/start.json``), are refused. A round that
draws no pair keeps nothing. ``OUTPUT/rounds.json`` lists what every round
drew and trained.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from nextstep.config import plain_differences
from nextstep.io import atomic_write_text, read_json_object
from nextstep.training.recipe import MODEL_DIR, RecipeConfig

if TYPE_CHECKING:
    from nextstep.evaluation.sampling import SamplingSettings
    from nextstep.evaluation.self_judged_pairs import Judge

PAIRS_DIR = "pairs"
#: The model a round drew its pairs with, written before it draws.
START_FILE = "start.json"
SUMMARY_FILE = "rounds.json"


@dataclass
class RoundRecord:
    """One round of `run_preference_rounds`.

    Attributes:
        round: 1 for the first round.
        start: the model the round drew with and trained from.
        model: the model the round wrote.
        pairs: preference pairs drawn.
        correct: share of the drawn images the judge found right (the start model's).
        seconds: wall time of the round's drawing and training in this call (about 0 when
            both were there already).
    """

    round: int
    start: str
    model: str
    pairs: int
    correct: float
    seconds: float


def check_round_recipe(recipe: RecipeConfig) -> None:
    """Refuse a recipe the rounds cannot run, without loading anything.

    Raises:
        ValueError: a recipe without a ``preference`` block, or whose data is not a
            single ``preference_manifest`` dataset (whose path each round replaces), or
            whose ``model`` training cannot build (`check_start_model`).
        FileNotFoundError: a ``model`` or ``image_tokenizer`` path with nothing there.
    """
    if not recipe.preference:
        raise ValueError("preference rounds need a preference recipe (a \"preference\" block such as "
                         "{\"beta\": 500}), found none")
    datasets = recipe.data.datasets
    if len(datasets) != 1 or datasets[0].get("type") != "preference_manifest":
        raise ValueError("preference rounds train on one preference_manifest dataset, whose path each round "
                         f"replaces; found {[dataset.get('type') for dataset in datasets]}")
    check_start_model(recipe)


def check_start_model(recipe: RecipeConfig) -> None:
    """Refuse a recipe whose ``model`` (with its ``model_arguments``) or ``image_tokenizer``
    `build_recipe_model` cannot read, without loading it: round 1 draws with that model.

    Raises:
        ValueError: a name that is no model preset (a shipped model's name included: recipes take
            its folder), or ``model_arguments`` the preset does not take.
        FileNotFoundError: a ``model`` written as a path, or an ``image_tokenizer``, with nothing there.
    """
    from nextstep.pretrained import bundled_model_path
    from nextstep.training.recipe import recipe_model_source

    if recipe.image_tokenizer and not Path(recipe.image_tokenizer).exists():
        raise FileNotFoundError(f"recipe image_tokenizer: expected a VAE checkpoint at {recipe.image_tokenizer!r}, "
                                "found nothing")
    try:
        recipe_model_source(recipe)
    except ValueError as error:
        shipped = bundled_model_path(recipe.model)
        if shipped is None:
            raise
        raise ValueError(f"preference rounds draw with and train the recipe's model as training builds it (a model "
                         f"directory or a preset name); {error}; {recipe.model!r} is a shipped model: give its "
                         f"folder {shipped} as the recipe's model") from None


def round_recipe(recipe: RecipeConfig, start: str | Path, pairs: str | Path, number: int) -> RecipeConfig:
    """``recipe`` as round ``number`` runs it: from ``start``, on the manifest ``pairs``, seed + number - 1.

    Raises:
        ValueError: a recipe `check_round_recipe` refuses.
    """
    check_round_recipe(recipe)
    dataset = {**recipe.data.datasets[0], "path": str(pairs)}
    return recipe.replace(model=str(start), data=recipe.data.replace(datasets=(dataset,)),
                          train=recipe.train.replace(seed=recipe.train.seed + number - 1))


def drawing_options(samples_per_prompt: int, combinations: str, settings: "SamplingSettings | None",
                    prompts: Sequence[str | dict] | None, judge: "Judge | None") -> dict:
    """What a round's pairs depend on besides its start model, as `run_preference_rounds` records it in the
    round's ``start.json``: the images per prompt, the prompts (the combinations, or a digest of the prompts
    given), the sampling settings but the batch size (None: the model's own), and the judge's name."""
    import hashlib

    from nextstep.evaluation.report_files import dumps_strict

    return json.loads(dumps_strict({  # as start.json holds it, to compare with what it holds
        "samples_per_prompt": samples_per_prompt,
        "prompts": (f"combinations {combinations}" if prompts is None else
                    "sha256 " + hashlib.sha256(dumps_strict(list(prompts), sort_keys=True).encode()).hexdigest()[:16]),
        "settings": None if settings is None else {k: v for k, v in settings.to_dict().items() if k != "batch_size"},
        "judge": None if judge is None else f"{getattr(judge, '__module__', '')}.{getattr(judge, '__qualname__', '')}",
    }, sort_keys=True))


def run_preference_rounds(recipe: RecipeConfig, output_dir: str | Path, *, rounds: int,
                          samples_per_prompt: int = 16, combinations: str = "seen",
                          settings: "SamplingSettings | None" = None, prompts: Sequence[str | dict] | None = None,
                          judge: "Judge | None" = None, device: str = "cpu",
                          show_progress: bool = True) -> list[RoundRecord]:
    """Run ``rounds`` rounds of drawing, judging and preference training; returns one record per round.

    Args:
        recipe: a preference recipe on one ``preference_manifest`` dataset; its
            ``model`` starts round 1, the dataset's path is replaced by each round's pairs.
        output_dir: ``round1/``, ``round2/``, ... and ``rounds.json`` go here.
        rounds: how many rounds (>= 1).
        samples_per_prompt: images drawn per prompt (as for
            `nextstep.evaluation.self_judged_pairs.write_self_judged_pairs`).
        combinations: which shapes GenEval prompts, when ``prompts`` is None.
        prompts: prompts of your own (strings or dicts with a ``prompt``).
        judge: ``judge(image, entry) -> bool`` (default: the shapes judge).
        settings: how to draw (default: each round's model's own settings, batch 32).
        device: where the images are drawn.
        show_progress: progress bars while drawing and training.

    A round that draws builds its start model once (`build_recipe_model` of the round's
    recipe, before anything of the round is written), draws with it in eval mode on
    ``device`` and trains that same model.

    Raises:
        ValueError: ``rounds`` below 1, or a recipe `check_round_recipe` refuses (before anything
            runs); a round that draws no pair (before it trains).
    """
    import shutil

    from tqdm import tqdm

    from nextstep.evaluation.self_judged_pairs import write_self_judged_pairs
    from nextstep.training.checkpointing import CheckpointManager
    from nextstep.training.recipe import build_recipe_model, check_same_recipe, run_recipe
    from nextstep.training.trainer import CHECKPOINTS_DIR

    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, found {rounds!r}")
    output_dir = Path(output_dir).resolve()  # rounds record paths under it: one spelling for every call
    check_round_recipe(recipe)  # before anything runs
    drawing = drawing_options(samples_per_prompt, combinations, settings, prompts, judge)
    summary = output_dir / SUMMARY_FILE
    # Rounds of an earlier call that this one does not run stay listed.
    earlier = {record["round"]: record for record in json.loads(summary.read_text())} if summary.is_file() else {}
    records, start = [], recipe.model
    for number in range(1, rounds + 1):
        folder = output_dir / f"round{number}"
        pairs, model_dir = folder / PAIRS_DIR, folder / MODEL_DIR
        this_round = round_recipe(recipe, start, pairs / "pairs.jsonl", number)
        advice = f"give the rounds another output folder, or remove {folder}"
        resume = CheckpointManager(folder / CHECKPOINTS_DIR).holds_checkpoint()
        if resume or (model_dir / "config.json").is_file():  # a kept round was made by this recipe
            check_same_recipe(this_round, folder, advice=advice)
        drawn_by = folder / START_FILE
        record = read_json_object(drawn_by, START_FILE) if drawn_by.is_file() else {}
        drawn_from = record.get("start")
        if (pairs / "summary.json").is_file() and drawn_from not in (None, str(start)):
            raise ValueError(f"{folder} drew its pairs with {drawn_from!r}, not {str(start)!r}; {advice}")
        recorded = record.get("drawing", drawing)  # older rounds recorded none
        if (pairs / "summary.json").is_file() and recorded != drawing:
            differing = ", ".join(f"{name} {there!r} there, {here!r} here"
                                  for name, there, here in plain_differences("drawing", recorded, drawing))
            raise ValueError(f"{folder} drew its pairs with other drawing options ({differing}); run the rounds "
                             f"with those options to go on, or {advice}")
        began = time.perf_counter()
        model = None  # built when the round draws, and trained next
        if not (pairs / "summary.json").is_file():
            model = build_recipe_model(this_round).to(device).eval()  # a model it cannot build stops it here
            # Before the pairs exist: what drew them.
            atomic_write_text(drawn_by, json.dumps({"start": str(start), "drawing": drawing}) + "\n")
            bar = tqdm(unit="img", desc=f"round {number}: drawing", disable=not show_progress)

            def drawn(done: int, total: int, bar=bar) -> None:
                bar.total = total
                bar.update(done - bar.n)

            write_self_judged_pairs(model, pairs, samples_per_prompt=samples_per_prompt, combinations=combinations,
                                    settings=settings, prompts=prompts, judge=judge, progress=drawn)
            bar.close()
        drawn = json.loads((pairs / "summary.json").read_text())
        if not drawn["pairs"]:
            shutil.rmtree(pairs)  # nothing to keep: the next call draws again, with its own settings
            drawn_by.unlink(missing_ok=True)
            raise ValueError(f"round {number} drew no pair: {drawn['correct']:.3f} of {drawn['images']} images were "
                             "judged right and no prompt had both a right and a wrong one (draw more per prompt, "
                             "or judge more strictly)")
        if not (model_dir / "config.json").is_file():
            # A round stopped before its first checkpoint starts its training over (setting that start aside).
            run_recipe(this_round, folder, resume=resume, show_progress=show_progress, model=model)
        model = None  # not held while the next round builds its own
        records.append(RoundRecord(round=number, start=str(start), model=str(model_dir), pairs=drawn["pairs"],
                                   correct=drawn["correct"], seconds=round(time.perf_counter() - began, 1)))
        listed = {**earlier, **{record.round: asdict(record) for record in records}}
        atomic_write_text(summary, json.dumps([listed[key] for key in sorted(listed)], indent=2) + "\n")
        start = str(model_dir)
    return records
