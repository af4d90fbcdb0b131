"""Named sets of training prompts, for drawing a model's own images from them (head distillation).

Every set holds prompts training sees, never those an evaluation holds out:
``shapes-seen`` the shapes world's seen GenEval combinations
(`nextstep.evaluation.shapes_geneval.geneval_prompts`), ``emoji-train`` the
captions of the training split of the emoji data (its Debian packages, ``make data``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable


def _shapes_seen() -> list[str]:
    from nextstep.evaluation.shapes_geneval import geneval_prompts

    return [entry["prompt"] for entry in geneval_prompts("seen")]


def _emoji_train() -> list[str]:
    from nextstep.training.data.emoji import EmojiConfig, EmojiDataset

    dataset = EmojiDataset(EmojiConfig(split="train"))
    return [dataset.caption(index) for index in range(len(dataset))]


PROMPT_SETS: dict[str, Callable[[], list[str]]] = {"shapes-seen": _shapes_seen, "emoji-train": _emoji_train}
"""Prompt sets by name, each a function returning its prompts (``nextstep distill-head --prompts NAME``)."""


def prompt_set(source: str) -> list[str]:
    """The prompts of a named set (`PROMPT_SETS`), or of a prompt file (one per line, or a ``.jsonl``
    file of objects with a ``prompt``; see `nextstep.evaluation.self_judged_pairs.read_prompt_file`).

    Raises:
        FileNotFoundError: neither a set's name nor a file, naming the sets.
        ValueError: a file without prompts.
    """
    if source in PROMPT_SETS:
        return PROMPT_SETS[source]()
    from nextstep.evaluation.self_judged_pairs import read_prompt_file

    if not Path(source).is_file():
        raise FileNotFoundError(f"expected a prompt file or one of the prompt sets {sorted(PROMPT_SETS)}, "
                                f"found {source!r}")
    return [entry if isinstance(entry, str) else entry["prompt"] for entry in read_prompt_file(source)]
