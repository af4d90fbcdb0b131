"""Text-to-image generation and image editing: prefill, cached decoding, one head sampling per token.

Legend: R images (prompts x images per prompt), G guidance branches,
P prompt length, N image tokens (h*w), D token dim, H hidden size, S solver steps.

Rows of the backbone batch are branch-major: ``[branch 0 rows; branch 1 rows; ...]``
with R rows each. Text-to-image branches are ``[prompt; negative prompt]``;
editing branches are ``[image + instruction; image + negative prompt; negative prompt]``.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence, Set

import torch
import torch.nn.functional as F

from nextstep.backbones.base import positions_from_mask
from nextstep.images import as_image_list, to_pil
from nextstep.reranking import best_candidates, candidate_score_function, check_candidates
from nextstep.samplers.base import Sampler
from nextstep.samplers.guidance import Guidance, GuidedVelocity, check_scale, guidance_for_scale
from nextstep.samplers.guidance_schedule import token_progress
from nextstep.samplers.promised_times import sample_checking_promise
from nextstep.samplers.step_schedule import StepSchedule, as_step_schedule, check_step_counts

if TYPE_CHECKING:
    from PIL import Image

    from nextstep.config import ComponentSpec
    from nextstep.fast import FastTokenSampler
    from nextstep.generation_defaults import GenerationDefaults
    from nextstep.model import NextStep

#: A prompt row: token ids (placeholders at image positions) and its images as (start, tokens (n, D)).
PromptRow = tuple[list[int], list[tuple[int, torch.Tensor]]]

#: Release defaults for editing, used when the caller leaves them unset.
EDITING_NEGATIVE_PROMPT = "Copy original image."
EDITING_IMAGE_SCALE = 2.0
EDITING_SHIFT = 3.2


def check_prompts(prompts) -> list[str]:
    """One prompt or a non-empty sequence of them -> a list of str (``ValueError`` otherwise)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, (bytes, Set, Mapping)) or not isinstance(prompts, Iterable):
        raise ValueError(f"prompts must be a str or a list of them, found {type(prompts).__name__}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts must contain at least one prompt, found an empty list")
    for prompt in prompts:
        if not isinstance(prompt, str):
            raise ValueError(f"every prompt must be a str, found {type(prompt).__name__}")
    return prompts


def _resolve_sampler(model: "NextStep", sampler: Sampler | str | None) -> Sampler:
    if sampler is None:
        return model.sampler
    if isinstance(sampler, str):
        from nextstep.registry import component_class

        cls = component_class("sampler", sampler)
        return cls(cls.config_class())
    if not isinstance(sampler, Sampler):
        raise ValueError(f"sampler must be a Sampler or a registered name, found {type(sampler).__name__}")
    return sampler


def sampler_with_options(own: "ComponentSpec", sampler: str | None,
                         options: Mapping[str, Any]) -> Sampler | str | None:
    """The sampler ``sampler`` (a registered name; None: the model's own) with the fields ``options`` of its config
    changed, as `generate_tokens` takes it.

    Without options this is ``sampler`` itself. The model's own sampler (``own``, by type) keeps its other
    settings; another starts from its config's defaults. An unknown field or a value the config refuses raises
    ``ValueError`` naming the sampler.

    Args:
        own: the model's default sampler, ``model.config.sampler``.
        sampler: a registered sampler name, or None.
        options: field name -> value of the sampler's config.

    Example: ``sampler_with_options(model.config.sampler, "euler_maruyama", {"last_step_size": 0})``.
    """
    if not isinstance(options, Mapping):
        raise ValueError(f"sampler options must be a mapping of config field -> value, found "
                         f"{type(options).__name__}")
    if not options:
        return sampler
    from nextstep.registry import component_class

    kind = sampler or own.type
    cls = component_class("sampler", kind)
    base = own.config if kind == own.type else cls.config_class()
    try:
        return cls(cls.config_class.from_dict({**base.to_dict(), **options}))
    except (ValueError, TypeError) as error:
        raise ValueError(f"sampler options for {kind}: {error}") from None


def check_seed(seed) -> None:
    """Raise ``ValueError`` unless ``seed`` is an integer in [0, 2**63): row ``r`` is seeded ``seed + r``,
    which a generator must take as it is."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, found {type(seed).__name__} {seed!r}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), found {seed}")


def _source_images(images, num_prompts: int) -> list[torch.Tensor]:
    """Input images -> one (1, 3, H, W) tensor in [-1, 1] per prompt."""
    tensors = as_image_list(images)
    if len(tensors) != num_prompts:
        raise ValueError(
            f"editing needs one input image per prompt: got {num_prompts} prompt(s) and "
            f"{len(tensors)} image(s)"
        )
    return tensors


def encode_each(model: "NextStep", images: list[torch.Tensor],
                seeds: Sequence[int] | None = None) -> list[tuple[torch.Tensor, int, int]]:
    """Encode (1, 3, H, W) images, sizes may differ: (tokens (h*w, D) float32, h, w) for each, in order.

    Images of one size are encoded together, one tokenizer call per size. A tokenizer that samples
    its latents (`nextstep.tokenizers.base.ImageTokenizer.samples_latents`) encodes each image alone
    instead, from a generator seeded ``seeds[i]`` (``i`` when None), so that an image's latents do not
    depend on the batch it came in.
    """
    tokenizer = model.image_tokenizer
    reference = next(tokenizer.parameters(), None)
    if seeds is not None and len(seeds) != len(images):
        raise ValueError(f"expected one seed per image ({len(images)}), found {len(seeds)}")
    groups: dict[object, list[int]] = {}
    for index, image in enumerate(images):
        groups.setdefault(index if tokenizer.samples_latents else tuple(image.shape[-2:]), []).append(index)
    sources: list[tuple[torch.Tensor, int, int]] = [None] * len(images)  # type: ignore[list-item]
    for indices in groups.values():
        batch = torch.cat([images[index] for index in indices])
        if reference is not None:
            batch = batch.to(reference.device, reference.dtype)
        generator = None
        if tokenizer.samples_latents:
            generator = torch.Generator().manual_seed(seeds[indices[0]] if seeds is not None else indices[0])
        try:
            tokens, grid_h, grid_w = model.encode_images(batch, generator)
        except ValueError as error:
            height, width = batch.shape[-2:]
            raise ValueError(f"input image(s) {indices} of {height}x{width} pixels: {error}") from None
        for index, image_tokens in zip(indices, tokens):
            sources[index] = (image_tokens.float(), grid_h, grid_w)
    return sources


def _output_grid(model: "NextStep", height: int | None, width: int | None,
                 sources: list[tuple[torch.Tensor, int, int]]) -> tuple[int, int]:
    """The token grid of the output: the given size, else the input images' (editing) or the model's default."""
    if height is None or width is None:
        if sources:
            sizes = {(h, w) for _, h, w in sources}
            if len(sizes) != 1:
                raise ValueError("input images differ in size; pass height and width for the output")
            pixels = model.image_tokenizer.pixels_per_token
            grid_h, grid_w = sizes.pop()
            height = grid_h * pixels if height is None else height
            width = grid_w * pixels if width is None else width
        else:
            height = model.config.generation.height if height is None else height
            width = model.config.generation.width if width is None else width
    return model.image_tokenizer.grid_size(height, width)


def _branch_rows(builder, conditional: list[str], negative: str, sources, grid: tuple[int, int],
                 branches: int, per_prompt: int) -> list[PromptRow]:
    """Prompt ids and image spans of every row, branch-major: G x (prompts x per_prompt) rows.

    Text-to-image: ``[prompt; negative]``. Editing (``sources`` given):
    ``[image + prompt; image + negative; negative]``, the first ``branches`` of them.
    """
    rows = []
    for branch in range(branches):
        for number, prompt in enumerate(conditional):
            text = prompt if branch == 0 else negative
            if sources and branch < 2:
                tokens, source_h, source_w = sources[number]
                ids, start = builder.editing_prompt(text, (source_h, source_w), *grid)
                row = (ids, [(start, tokens)])
            else:
                row = (builder.prompt(text, *grid), [])
            rows.extend([row] * per_prompt)
    return rows


def embed_prompt_rows(model: "NextStep", rows: list[PromptRow], device,
                      dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt rows (ids, image spans) -> left-padded embeddings (G*R, P, H) and attention mask (G*R, P).

    Image spans ``(start, tokens (n, D))`` replace the placeholders at ``start`` with
    the projected image tokens.
    """
    builder = model.sequences
    input_ids, attention_mask = builder.left_pad([ids for ids, _ in rows])
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    if not any(spans for _, spans in rows):
        return model.embed_text(input_ids), attention_mask
    length = input_ids.shape[1]
    image_mask = torch.zeros(input_ids.shape, dtype=torch.bool)
    image_tokens = torch.zeros(*input_ids.shape, model.token_dim)
    for row, (ids, spans) in enumerate(rows):
        offset = length - len(ids)
        for start, tokens in spans:
            span = slice(offset + start, offset + start + tokens.shape[0])
            image_mask[row, span] = True
            image_tokens[row, span] = tokens.cpu()
    embeds = model.embed(input_ids, image_mask.to(device), image_tokens.to(device, dtype))
    return embeds, attention_mask


def prefill(model: "NextStep", rows: list[PromptRow], new_tokens: int, device, dtype, new_cache=None
            ) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor]:
    """Read left-padded prompt rows into a new cache with room for ``new_tokens`` more per row.

    ``new_cache(rows, length, dtype=)`` makes the cache (default: the backbone's ``new_cache``).

    Returns:
        the last position's hidden state (R, H), the cache, the position of each
        row's next token (R, 1), and the all-real mask (R, 1) of one decoding step.
    """
    embeds, attention_mask = embed_prompt_rows(model, rows, device, dtype)  # (R, P, H)
    cache = (new_cache or model.backbone.new_cache)(len(rows), embeds.shape[1] + new_tokens, dtype=dtype)
    positions = positions_from_mask(attention_mask)
    hidden = model.backbone(embeds, positions, attention_mask, cache)[:, -1]
    step_mask = torch.ones(len(rows), 1, dtype=torch.bool, device=device)
    return hidden, cache, positions[:, -1:] + 1, step_mask


def _draw_noise(num_images, seed, num_tokens, token_dim, max_steps, stochastic, temperature, device,
                candidates=1):
    """Per-image noise from generators seeded ``seed + r``: starting points (R*K, N, D),
    and for stochastic samplers step noise (N, S, R*K, D); both scaled by ``temperature``.
    Row r*K + j is candidate j of image r: its generator's j-th pair of draws."""
    noise, step_noise = [], []
    for image in range(num_images):
        generator = torch.Generator().manual_seed(seed + image)
        for _ in range(candidates):
            noise.append(torch.randn(num_tokens, token_dim, generator=generator))
            if stochastic:
                step_noise.append(torch.randn(num_tokens, max_steps, token_dim, generator=generator))
    steps = (torch.stack(step_noise, dim=2) * temperature).to(device) if stochastic else None
    return (torch.stack(noise) * temperature).to(device), steps


def _in_inference_mode(fn: Callable) -> Callable:
    """Run a sampling function under ``torch.inference_mode`` (less per-op overhead than
    ``no_grad``) and return its tokens as an ordinary tensor."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.inference_mode():
            tokens, grid_h, grid_w = fn(*args, **kwargs)
        return tokens.clone(), grid_h, grid_w

    return wrapper


@_in_inference_mode
def generate_tokens(
    model: "NextStep",
    prompts: list[str] | str,
    *,
    images: "Image.Image | torch.Tensor | Sequence[Image.Image | torch.Tensor] | None" = None,
    height: int | None = None,
    width: int | None = None,
    cfg: float | Guidance | None = None,
    cfg_img: float | None = None,
    cfg_schedule: str | None = None,
    num_steps: int | StepSchedule | None = None,
    shift: float | None = None,
    seed: int = 0,
    negative_prompt: str | None = None,
    positive_prompt: str = "",
    num_images_per_prompt: int = 1,
    sampler: Sampler | str | None = None,
    temperature: float = 1.0,
    use_norm: bool | None = None,
    progress: bool | Callable[[int, int], None] | None = None,
    candidates: int | None = None,
    candidate_score: str | None = None,
    token_sampler: "FastTokenSampler | None" = None,
) -> tuple[torch.Tensor, int, int]:
    """Sample image tokens for prompts (text-to-image) or instructions (editing, with ``images``).

    Image ``r`` (prompt ``r // num_images_per_prompt``) draws all its noise from
    its own generator seeded with ``seed + r``, so a batch gives the images that
    the same prompts give one at a time (up to floating-point rounding: a batch's
    matrix products round differently). An edit's source is encoded once per
    prompt; a tokenizer that samples its latents draws them with the seed of the
    prompt's first image.

    ``cfg``, ``cfg_schedule``, ``num_steps``, ``height`` and ``width`` left as
    None come from ``model.config.generation``
    (`nextstep.generation_defaults.GenerationDefaults`: the settings the model
    was tuned for, else the release's).

    Args:
        prompts: one prompt or a list (editing: the instructions).
        images: editing input images, one per prompt: PIL images or a
            (B, 3, H, W) tensor in [-1, 1]. They are encoded into the context
            before the instruction. None for text-to-image.
        height: output pixels, a positive multiple of the tokenizer's pixels per
            token (16); defaults to the input images' height when editing, else
            the model's default.
        width: output pixels, like ``height``.
        cfg: text guidance scale (1 disables the unconditional branch), or any
            `nextstep.samplers.guidance.Guidance` object; default: the model's.
        cfg_img: image guidance scale for editing (default 2.0; 1 drops the
            third branch). An error without ``images``.
        cfg_schedule: how the scales change over the tokens of an image:
            ``constant``, ``linear_increasing``, ``linear_decreasing``
            (``linear`` is the release's name for ``linear_decreasing``); default:
            the model's. An error beside a Guidance object, which carries its own.
        num_steps: head integration steps per token, or a
            `nextstep.samplers.step_schedule.StepSchedule` (fewer steps for later
            tokens); default: the model's.
        shift: time shift of the sampling grid (default 1.0, or 3.2 when editing).
        seed: base seed.
        negative_prompt: text of the unconditional branches (default ``""``, or
            ``"Copy original image."`` when editing).
        positive_prompt: appended to every prompt after a space (e.g. quality words).
        num_images_per_prompt: images per prompt.
        sampler: a `nextstep.samplers.base.Sampler` or a registered sampler name;
            defaults to the model's.
        temperature: scale of every noise draw (the starting noise and the
            per-step noise of stochastic samplers); 1 samples the model's
            distribution, smaller is more conservative.
        use_norm: LayerNorm each sampled token; defaults to ``model.config.use_norm``.
        progress: True for a progress bar, or a callable ``progress(done, total)``
            called after each token.
        candidates: text-to-image samples per image, K; the one the model scores
            highest against its prompt is kept (`nextstep.reranking`).
            Candidate 0 of image ``r`` is the image ``candidates=1`` gives; the
            others continue the draws of its generator. Default: the model's
            (1 when editing, which draws each image once).
        candidate_score: the score that ranks candidates, a name of
            `nextstep.reranking.CANDIDATE_SCORES` (``flow`` or ``caption``);
            default: the model's.
        token_sampler: a `nextstep.fast.FastTokenSampler` of ``model`` that samples
            the tokens after the prefill (captured CUDA graphs and fused kernels
            on a GPU; the same tokens up to rounding). None: the loop here.

    Returns:
        tokens (R, N, D) float32, grid height h, grid width w.

    Warns:
        RuntimeWarning: an image's tokens are not finite (the sampling diverged), naming the images and
            settings; ``nextstep generate`` refuses to save such images.
    """
    request = checked_request(
        model, prompts, editing=images is not None, cfg=cfg, cfg_img=cfg_img, cfg_schedule=cfg_schedule,
        num_steps=num_steps, shift=shift, seed=seed, negative_prompt=negative_prompt, positive_prompt=positive_prompt,
        num_images_per_prompt=num_images_per_prompt, sampler=sampler, temperature=temperature, use_norm=use_norm,
        progress=progress, candidates=candidates, candidate_score=candidate_score, token_sampler=token_sampler)
    prompts, editing, guidance, branches = request.prompts, request.editing, request.guidance, request.branches
    cfg, num_steps, schedule, shift = request.cfg, request.num_steps, request.schedule, request.shift
    sampler, temperature, use_norm, negative_prompt = request.sampler, request.temperature, request.use_norm, \
        request.negative_prompt
    candidates, score = request.candidates, request.score

    # A source image is encoded as when its prompt is generated alone, whose first image gets the seed.
    source_seeds = [seed + index * num_images_per_prompt for index in range(len(prompts))]
    sources = encode_each(model, _source_images(images, len(prompts)), source_seeds) if editing else []
    grid_h, grid_w = _output_grid(model, height, width, sources)
    conditional = [p + " " + positive_prompt if positive_prompt else p for p in prompts]
    rows = _branch_rows(model.sequences, conditional, negative_prompt, sources, (grid_h, grid_w), branches,
                        num_images_per_prompt * candidates)

    backbone, head = model.backbone, model.image_head
    device = next(model.parameters()).device
    dtype = next(backbone.parameters()).dtype
    num_images, num_tokens, token_dim = len(prompts) * num_images_per_prompt, grid_h * grid_w, model.token_dim
    num_rows = num_images * candidates

    check_step_counts(sampler, schedule, num_tokens, shift)  # before the prefill
    settings = (f"cfg {guidance if isinstance(cfg, Guidance) else cfg}, temperature {temperature}, shift {shift}, "
                f"steps {num_steps}, sampler {type(sampler).__name__}")
    noise, step_noise = _draw_noise(num_images, seed, num_tokens, token_dim, schedule.max_steps(num_tokens),
                                    sampler.stochastic, temperature, device, candidates)
    hidden, cache, next_positions, step_mask = prefill(  # hidden (G*R, H)
        model, rows, num_tokens, device, dtype, None if token_sampler is None else token_sampler.new_cache)
    if token_sampler is not None:
        tokens = token_sampler.sample_tokens(hidden, cache, next_positions, noise, step_noise, guidance=guidance,
                                             sampler=sampler, num_steps=schedule, shift=shift, use_norm=use_norm,
                                             progress=progress)
        return _keep_best(model, tokens, conditional, num_images_per_prompt, candidates, score, grid_h, grid_w,
                          settings)

    # steps -> (grid, prepared times, promised times until a first token confirmed them, then None)
    grids: dict[int, tuple[torch.Tensor, Any, torch.Tensor | None]] = {}
    bar = None
    if progress is True:
        from tqdm import tqdm

        bar = tqdm(total=num_tokens, unit="tok")
    tokens = torch.empty(num_rows, num_tokens, token_dim, device=device)
    for index in range(num_tokens):
        steps = schedule.steps_for(index, num_tokens)
        if steps not in grids:
            grid = sampler.make_time_grid(steps, shift, device=device)
            promised = sampler.evaluation_times(grid)
            grids[steps] = (grid, None if promised is None else head.prepare_times(promised), promised)
        grid, times, promised = grids[steps]
        conditions = model.image_out_projector(hidden).view(branches, num_rows, -1)
        velocity = GuidedVelocity(head, conditions, guidance, times=times,
                                  progress=token_progress(index, num_tokens))
        token_noise = None if step_noise is None else step_noise[index, :steps]  # (S, R, D)
        token = sample_checking_promise(sampler, velocity, noise[:, index], grid, token_noise, promised)  # (R, D)
        grids[steps] = (grid, times, None)
        if use_norm:
            token = F.layer_norm(token, token.shape[-1:], eps=1e-6)
        tokens[:, index] = token
        if bar is not None:
            bar.update(1)
        elif callable(progress):
            progress(index + 1, num_tokens)
        if index == num_tokens - 1:
            break
        embeds = torch.cat([model.image_in_projector(token.to(dtype))] * branches)[:, None]  # (G*R, 1, H)
        hidden = backbone(embeds, next_positions, step_mask, cache)[:, 0]
        next_positions = next_positions + 1
    if bar is not None:
        bar.close()
    return _keep_best(model, tokens, conditional, num_images_per_prompt, candidates, score, grid_h, grid_w,
                      settings)


@dataclass(frozen=True)
class CheckedRequest:
    """The options of a generation, checked, with the defaults filled in (`checked_request`)."""

    prompts: list[str]
    editing: bool
    guidance: Guidance
    branches: int
    cfg: float | Guidance
    num_steps: int | StepSchedule
    schedule: StepSchedule
    shift: float
    sampler: Sampler
    temperature: float
    use_norm: bool
    negative_prompt: str
    candidates: int
    score: Callable


def checked_request(model: "NextStep", prompts, *, editing: bool = False, cfg=None, cfg_img=None,
                    cfg_schedule=None, num_steps=None, shift=None, seed=0, negative_prompt=None, positive_prompt="",
                    num_images_per_prompt=1, sampler=None, temperature=1.0, use_norm=None, progress=None,
                    candidates=None, candidate_score=None, token_sampler=None) -> CheckedRequest:
    """The options of `generate_tokens` checked and resolved (each left None the model's own or the
    editing default), before anything is encoded or sampled: the prompts as a list, the guidance and its
    number of branches, the step schedule, the sampler, ``use_norm``, the negative prompt, the candidates
    and the function that scores them.

    Raises:
        ValueError: an option out of its range or of the wrong type, naming what was expected and found.
    """
    prompts = check_prompts(prompts)
    from nextstep.model import NextStep

    if not isinstance(model, NextStep):
        raise ValueError(f"model must be a NextStep model (nextstep.load_model or build_model), found "
                         f"{type(model).__name__}")
    if token_sampler is not None:
        from nextstep.fast.token_sampler import FastTokenSampler

        if not isinstance(token_sampler, FastTokenSampler):
            raise ValueError(f"token_sampler must be a FastTokenSampler (FastTokenSampler(model), or "
                             f"nextstep.fast.token_sampler.token_sampler_named(model, name)), found "
                             f"{type(token_sampler).__name__} {token_sampler!r:.40}")
        if token_sampler.model is not model:
            raise ValueError("token_sampler samples another model; build it with FastTokenSampler(model)")
    if progress is not None and not isinstance(progress, bool) and not callable(progress):
        raise ValueError(f"progress must be True (a progress bar), False or None (none) or a callable "
                         f"progress(done, total), found {type(progress).__name__} {progress!r:.40}")
    if cfg_img is not None and not editing:
        raise ValueError("cfg_img is the image guidance of editing; it needs input images, found images=None")
    if isinstance(cfg, Guidance) and cfg_img is not None:
        raise ValueError("pass cfg_img inside the guidance object when cfg is a Guidance")
    if isinstance(cfg, Guidance) and cfg_schedule is not None:
        raise ValueError(f"cfg_schedule schedules a guidance scale; a Guidance object carries its own schedule (give "
                         f"it when building the object), found cfg={type(cfg).__name__} and cfg_schedule="
                         f"{cfg_schedule!r}")
    chosen = resolved_settings(model, editing=editing, cfg=cfg, cfg_schedule=cfg_schedule, num_steps=num_steps,
                               shift=shift, temperature=temperature, cfg_img=cfg_img, candidates=candidates,
                               candidate_score=candidate_score, negative_prompt=negative_prompt)
    cfg, cfg_schedule, num_steps, shift = chosen["cfg"], chosen["cfg_schedule"], chosen["num_steps"], chosen["shift"]
    cfg_img, negative_prompt = chosen["cfg_img"], chosen["negative_prompt"]
    score = candidate_score_function(chosen["candidate_score"])
    candidates = check_candidates(chosen["candidates"])
    if editing and candidates > 1:
        raise ValueError(f"candidates ranks text-to-image samples; editing (images given) draws each image "
                         f"once, found candidates={candidates}")
    check_seed(seed)
    if not isinstance(num_images_per_prompt, int) or isinstance(num_images_per_prompt, bool) \
            or num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be an integer >= 1, found {num_images_per_prompt!r}")
    schedule = as_step_schedule(num_steps)
    temperature = check_scale("temperature", temperature)
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not 0 < shift < math.inf:
        raise ValueError(f"shift must be a finite positive number, found {shift!r}")
    if isinstance(cfg, Guidance):
        guidance = cfg
    else:
        check_scale("cfg", cfg)
        guidance = guidance_for_scale(cfg, image_scale=cfg_img, schedule=cfg_schedule)
    branches = guidance.num_branches
    if editing and not 1 <= branches <= 3:
        raise ValueError(f"editing supports guidance with 1 to 3 branches, found {branches}")
    if not editing and branches == 3:
        raise ValueError("three-branch (editing) guidance needs input images; text-to-image "
                         "supports guidance with 1 or 2 branches")
    if not editing and not 1 <= branches <= 2:
        raise ValueError(f"text-to-image supports guidance with 1 or 2 branches, found {branches}")
    sampler = _resolve_sampler(model, sampler)
    use_norm = model.config.use_norm if use_norm is None else use_norm
    if not isinstance(use_norm, bool):
        raise ValueError(f"use_norm must be True, False or None (the model's setting), found {use_norm!r}")
    if not isinstance(positive_prompt, str):
        raise ValueError(f"positive_prompt must be a str, found {type(positive_prompt).__name__} {positive_prompt!r}")
    if not isinstance(negative_prompt, str):
        raise ValueError(f"negative_prompt must be a str (or None for the default), found "
                         f"{type(negative_prompt).__name__} {negative_prompt!r}")
    if model.config.distilled_head:
        _warn_off_distillation(model.config.distilled_head, guidance, schedule, shift, sampler, candidates)
    return CheckedRequest(prompts=prompts, editing=editing, guidance=guidance, branches=branches, cfg=cfg,
                          num_steps=num_steps, schedule=schedule, shift=shift, sampler=sampler,
                          temperature=temperature, use_norm=use_norm, negative_prompt=negative_prompt,
                          candidates=candidates, score=score)


def _warn_off_distillation(fitted: dict, guidance: Guidance, schedule: StepSchedule, shift: float, sampler: Sampler,
                           candidates: int) -> None:
    """Warn when a distilled head (``fitted``: `ModelConfig.distilled_head`) is asked to sample otherwise than it
    was fitted to: K Euler steps on the unshifted grid, one branch, one candidate."""
    from nextstep.samplers.euler import EulerSampler
    from nextstep.samplers.step_schedule import ConstantSteps

    steps = fitted["steps"]
    other = []
    if guidance.num_branches != 1 or getattr(guidance, "scale", 1.0) != 1.0:
        other.append(f"guidance {getattr(guidance, 'scale', type(guidance).__name__)} (it holds the teacher's "
                     f"{fitted.get('teacher_cfg', 'guidance')}: sample it at 1)")
    if not (isinstance(schedule, ConstantSteps) and schedule.num_steps == steps):
        shown = schedule.num_steps if isinstance(schedule, ConstantSteps) else schedule
        other.append(f"{shown} steps (fitted for {steps})")
    if type(sampler) is not EulerSampler:
        other.append(f"sampler {type(sampler).__name__} (fitted for EulerSampler)")
    if shift != 1.0:
        other.append(f"shift {shift} (fitted on the unshifted grid)")
    if candidates != 1:
        other.append(f"{candidates} candidates (its flow error ranks nothing it was fitted for)")
    if other:
        warnings.warn(f"this model's image head was distilled to sample {steps} Euler steps without guidance; "
                      f"sampling it with {', '.join(other)} draws other images than it was fitted to",
                      UserWarning, stacklevel=4)


def resolved_settings(model: "NextStep", *, editing: bool = False, cfg=None, cfg_schedule: str | None = None,
                      num_steps=None, shift: float | None = None, sampler=None, temperature: float = 1.0,
                      cfg_img: float | None = None, candidates: int | None = None,
                      candidate_score: str | None = None, negative_prompt: str | None = None) -> dict[str, Any]:
    """The settings `generate_tokens` draws with for these options: each one left None replaced by its
    default, the model's own (``model.config.generation``, its sampler) or the editing ones when ``editing``.

    Returns a dict with keys ``cfg``, ``cfg_schedule``, ``num_steps``, ``shift``, ``sampler`` (the name
    of the model's sampler when none is given), ``temperature``, ``cfg_img`` (None for text-to-image),
    ``candidates``, ``candidate_score`` and ``negative_prompt``; values given are returned as they are
    (checking them is `generate_tokens`'s).
    """
    defaults = model.config.generation
    return {
        "cfg": defaults.cfg if cfg is None else cfg,
        "cfg_schedule": defaults.cfg_schedule if cfg_schedule is None else cfg_schedule,
        "num_steps": defaults.num_steps if num_steps is None else num_steps,
        "shift": (EDITING_SHIFT if editing else 1.0) if shift is None else shift,
        "sampler": model.config.sampler.type if sampler is None else sampler,
        "temperature": temperature,
        "cfg_img": (EDITING_IMAGE_SCALE if cfg_img is None else cfg_img) if editing else cfg_img,
        "candidates": default_candidates(defaults, editing) if candidates is None else candidates,
        "candidate_score": defaults.candidate_score if candidate_score is None else candidate_score,
        "negative_prompt": (EDITING_NEGATIVE_PROMPT if editing else "") if negative_prompt is None
        else negative_prompt,
    }


def default_candidates(defaults: GenerationDefaults, editing: bool) -> int:
    """The candidates per image a call that names none draws: the model's own best-of-K for text-to-image,
    one for an edit (which draws each image once)."""
    return 1 if editing else defaults.candidates


def _keep_best(model, tokens, conditional, num_images_per_prompt, candidates, score, grid_h, grid_w, settings):
    """(tokens of the best candidate of each image, grid height, grid width); a warning names the images
    whose tokens are not finite (the sampling diverged) and the ``settings`` they were drawn with."""
    if candidates > 1:
        row_prompts = [prompt for prompt in conditional for _ in range(num_images_per_prompt * candidates)]
        scores = score(model, row_prompts, tokens, grid_h, grid_w)
        tokens = best_candidates(tokens, scores, candidates)
    finite = torch.isfinite(tokens).flatten(1).all(dim=1)  # (R,)
    if not finite.all():
        rows = torch.nonzero(~finite).flatten().tolist()
        warnings.warn(f"the tokens of image(s) {rows} are not finite: sampling diverged with {settings}; a smaller "
                      "cfg, temperature or shift, or more steps, keeps it finite", RuntimeWarning, stacklevel=3)
    return tokens, grid_h, grid_w


@torch.no_grad()
def decode_tokens(model: "NextStep", tokens: torch.Tensor, grid_height: int, grid_width: int) -> torch.Tensor:
    """Tokens (R, N, D) -> images (R, 3, H, W) in [-1, 1], decoded in the device and dtype of the image
    tokenizer's decoder (of its first weight, for a tokenizer without a ``decoder``)."""
    tokenizer = model.image_tokenizer
    reference = next(getattr(tokenizer, "decoder", tokenizer).parameters(), None)
    if reference is not None:
        tokens = tokens.to(reference.device, reference.dtype)
    latents = tokenizer.unpatchify(tokens, grid_height, grid_width)
    return tokenizer.decode(latents).float().clamp(-1, 1)


def generate(
    model: "NextStep", prompts: list[str] | str, *, return_tokens: bool = False, **kwargs: Any
) -> list["Image.Image"] | tuple[list["Image.Image"], torch.Tensor]:
    """Generate PIL images; keyword arguments are those of `generate_tokens`.

    Args:
        model: the model.
        prompts: one prompt or a list (editing: the instructions, with ``images=``).
        return_tokens: also return the sampled tokens (R, N, D).
        **kwargs: see `generate_tokens`.
    """
    tokens, grid_h, grid_w = generate_tokens(model, prompts, **kwargs)
    images = to_pil(decode_tokens(model, tokens, grid_h, grid_w))
    return (images, tokens) if return_tokens else images
