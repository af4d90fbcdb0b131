"""Generate the images an evaluation scores: fixed settings, fixed seeds, any batch size."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Iterator

from nextstep.config import require
from nextstep.samplers.guidance_schedule import resolve_guidance_schedule

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from nextstep.fast import FastTokenSampler
    from nextstep.generation_defaults import GenerationDefaults
    from nextstep.model import NextStep


@dataclass(frozen=True)
class SamplingSettings:
    """How an evaluation samples images.

    Args:
        height: image height in pixels.
        width: image width in pixels.
        cfg: classifier-free guidance scale.
        cfg_schedule: how the guidance scale changes over an image's tokens
            (`nextstep.samplers.guidance_schedule.GUIDANCE_SCHEDULES`).
        num_steps: head steps per token.
        seed: seed of image 0; image ``i`` of a run uses ``seed + i`` whatever the batch size.
        batch_size: images generated together.
        sampler: a registered sampler name (None: the model's own).
        sampler_options: fields of the sampler's config to change, name -> value
            (`nextstep.generation.sampler_with_options`); None or empty: none.
        temperature: scale of the starting noise of every token (1: the model's distribution).
        candidates: samples per image, the model keeping the one it scores highest against
            the prompt (`nextstep.reranking`); None: the model's default.
        candidate_score: what ranks the candidates, a name of
            `nextstep.reranking.CANDIDATE_SCORES`; None: the model's default.
        token_sampler: how the tokens are sampled after the prefill, a name of
            `nextstep.fast.token_sampler.TOKEN_SAMPLERS`: ``loop`` (the plain
            loop), ``fast`` (captured graphs and fused kernels on a GPU, the same
            tokens up to rounding), ``fused``, ``skinny`` (the fused decode
            step) or ``int8`` (it, through int8 weights).
    """

    height: int = 64
    width: int = 64
    cfg: float = 3.0
    cfg_schedule: str = "constant"
    num_steps: int = 20
    seed: int = 0
    batch_size: int = 16
    sampler: str | None = None
    sampler_options: dict[str, Any] | None = None
    temperature: float = 1.0
    candidates: int | None = None
    candidate_score: str | None = None
    token_sampler: str = "loop"

    def __post_init__(self) -> None:
        require(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        require(self.num_steps >= 1, "num_steps", self.num_steps, ">= 1")
        require(self.sampler_options is None or (isinstance(self.sampler_options, dict)
                                                  and all(isinstance(key, str) for key in self.sampler_options)),
                "sampler_options", self.sampler_options, "None or a dict of config field name -> value")
        require(self.candidates is None or self.candidates >= 1, "candidates", self.candidates, "None or >= 1")
        resolve_guidance_schedule(self.cfg_schedule)
        from nextstep.fast.token_sampler import TOKEN_SAMPLERS

        require(self.token_sampler in TOKEN_SAMPLERS, "token_sampler", self.token_sampler, f"one of {TOKEN_SAMPLERS}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_defaults(cls, defaults: "GenerationDefaults", **changes) -> "SamplingSettings":
        """A model's own sampling settings (its config's ``generation`` block: size, guidance,
        steps, candidates and their score), with ``changes`` applied."""
        return replace(cls(height=defaults.height, width=defaults.width, cfg=defaults.cfg,
                           cfg_schedule=defaults.cfg_schedule, num_steps=defaults.num_steps,
                           candidates=defaults.candidates, candidate_score=defaults.candidate_score), **changes)


def generate_images(model: "NextStep", prompts: list[str], settings: SamplingSettings,
                    progress: Callable[[int, int], None] | None = None) -> list["Image.Image"]:
    """One image per prompt; image ``i`` is seeded ``settings.seed + i``.

    Args:
        model: the model to sample.
        prompts: one prompt per image (repeat a prompt for several images).
        settings: sampling settings.
        progress: called with (images done, images in all) after each batch.
    """
    import torch

    from nextstep.generation import decode_tokens
    from nextstep.images import to_pil

    images: list = []
    for tokens, grid_h, grid_w in sample_token_batches(model, prompts, settings, progress):
        with torch.no_grad():
            images.extend(to_pil(decode_tokens(model, tokens, grid_h, grid_w)))
    return images


def sample_token_batches(model: "NextStep", prompts: list[str], settings: SamplingSettings,
                         progress: Callable[[int, int], None] | None = None, *,
                         use_norm: bool | None = None,
                         token_sampler: "FastTokenSampler | None" = None) -> Iterator[tuple["torch.Tensor", int, int]]:
    """The image tokens of one image per prompt, a batch of ``settings.batch_size`` at a time: (B, h*w, D)
    tokens and the grid (h, w) per batch; image ``i`` is seeded ``settings.seed + i``, whatever the batch size.

    Args:
        model: the model to sample (put in eval mode).
        prompts: one prompt per image.
        settings: sampling settings.
        progress: called with (images done, images in all) after each batch.
        use_norm: LayerNorm each sampled token (None: the model's setting).
        token_sampler: the `FastTokenSampler` ``settings.token_sampler`` names, built by a caller that samples
            several times (it keeps captured graphs and prepared weights); None: built here.
    """
    from nextstep.fast.token_sampler import token_sampler_named
    from nextstep.generation import generate_tokens, sampler_with_options

    if token_sampler is None:
        token_sampler = token_sampler_named(model, settings.token_sampler)
    sampler = sampler_with_options(model.config.sampler, settings.sampler, settings.sampler_options or {})
    model.eval()
    for start in range(0, len(prompts), settings.batch_size):
        batch = prompts[start:start + settings.batch_size]
        tokens, grid_h, grid_w = generate_tokens(  # under inference mode, tokens that need no gradient
            model, batch, height=settings.height, width=settings.width, cfg=settings.cfg,
            cfg_schedule=settings.cfg_schedule,
            num_steps=settings.num_steps, seed=settings.seed + start, sampler=sampler,
            temperature=settings.temperature, candidates=settings.candidates,
            candidate_score=settings.candidate_score, token_sampler=token_sampler, use_norm=use_norm,
        )
        yield tokens, grid_h, grid_w
        if progress is not None:
            progress(start + len(batch), len(prompts))
