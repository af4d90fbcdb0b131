"""The sampling settings a model recommends, saved with it in ``config.json``.

`nextstep.generation.generate_tokens` (and so ``model.generate``, ``nextstep
generate`` and ``nextstep eval``) fills every sampling argument the caller leaves
unset from ``model.config.generation``. The defaults are the NextStep-1
release's sampling settings (guidance 7.5, constant, 50 head steps) at 256x256,
the first resolution it trains at (the release's own default size is 512x512,
four times the tokens). A model trained by a recipe records the size it trained
at (the recipe's ``data.resolution``), and a tuned model stores the settings it
was tuned for (the shipped ``emoji-shapes-64`` does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from nextstep.config import OMITTED_WHEN_DEFAULT, Config, require, require_count
from nextstep.reranking import candidate_score_function
from nextstep.samplers.guidance_schedule import resolve_guidance_schedule


@dataclass
class GenerationDefaults(Config):
    """Sampling settings used when a call leaves them unset.

    Args:
        cfg: classifier-free guidance scale (1 disables the unconditional branch).
        cfg_schedule: how the scale changes over an image's tokens
            (`nextstep.samplers.guidance_schedule.GUIDANCE_SCHEDULES`).
        num_steps: head integration steps per token.
        height: text-to-image output height in pixels.
        width: text-to-image output width in pixels.
        candidates: text-to-image samples drawn per image, of which the one the
            model scores highest against its prompt is kept
            (`nextstep.reranking`); 1 draws each image once.
        candidate_score: the score that ranks the candidates, a name of
            `nextstep.reranking.CANDIDATE_SCORES`.
    """

    cfg: float = 7.5
    cfg_schedule: str = "constant"
    num_steps: int = 50
    height: int = 256
    width: int = 256
    candidates: int = field(default=1, metadata=OMITTED_WHEN_DEFAULT)
    candidate_score: str = field(default="flow", metadata=OMITTED_WHEN_DEFAULT)

    def validate(self) -> None:
        require(not isinstance(self.cfg, bool) and isinstance(self.cfg, (int, float)) and 0 <= self.cfg < math.inf,
                "cfg", self.cfg, "a finite number >= 0")
        resolve_guidance_schedule(self.cfg_schedule)
        candidate_score_function(self.candidate_score)
        for name in ("num_steps", "height", "width", "candidates"):
            require_count(name, getattr(self, name))

    def overridden(self, **values: Any) -> "GenerationDefaults":
        """These settings with each of ``values`` that is not None in its place (validated again)."""
        return self.replace(**{name: value for name, value in values.items() if value is not None})
