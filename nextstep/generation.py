"""Text-to-image generation: prefill, cached decoding, one head sampling per image token.

Legend: R images (prompts x images per prompt), G guidance branches,
P prompt length, N image tokens (h*w), D token dim, H hidden size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

from nextstep.backbones.base import positions_from_mask
from nextstep.images import to_pil
from nextstep.samplers.base import Sampler
from nextstep.samplers.guidance import GuidedVelocity, guidance_for_scale
from nextstep.samplers.time_grid import time_grid

if TYPE_CHECKING:
    from PIL import Image

    from nextstep.model import NextStep


def _check_arguments(prompts, height, width, cfg, num_steps, num_images_per_prompt) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts must contain at least one prompt, found an empty list")
    for prompt in prompts:
        if not isinstance(prompt, str):
            raise ValueError(f"every prompt must be a str, found {type(prompt).__name__}")
    if not (isinstance(cfg, (int, float)) and cfg >= 0):
        raise ValueError(f"cfg must be a number >= 0, found {cfg!r}")
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, found {num_steps!r}")
    if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be an integer >= 1, found {num_images_per_prompt!r}")
    return prompts


@torch.no_grad()
def generate_tokens(
    model: "NextStep",
    prompts: list[str] | str,
    *,
    height: int = 256,
    width: int = 256,
    cfg: float = 7.5,
    num_steps: int = 50,
    shift: float = 1.0,
    seed: int = 0,
    negative_prompt: str = "",
    num_images_per_prompt: int = 1,
    sampler: Sampler | None = None,
    use_norm: bool | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, int, int]:
    """Sample image tokens for prompts.

    Image ``r`` (prompt ``r // num_images_per_prompt``) draws all its noise from
    its own generator seeded with ``seed + r``, so a batch gives the images that
    the same prompts give one at a time.

    Args:
        prompts: one prompt or a list.
        height: pixels, a positive multiple of the tokenizer's pixels per token (16).
        width: pixels, a positive multiple of the tokenizer's pixels per token (16).
        cfg: classifier-free guidance scale (1 disables the unconditional branch).
        num_steps: head integration steps per token.
        shift: time shift of the sampling grid.
        seed: base seed.
        negative_prompt: text of the unconditional branch.
        num_images_per_prompt: images per prompt.
        sampler: overrides the model's sampler.
        use_norm: LayerNorm each sampled token; defaults to ``model.config.use_norm``.
        progress: called as ``progress(done, total)`` after each token.

    Returns:
        tokens (R, N, D) float32, grid height h, grid width w.
    """
    prompts = _check_arguments(prompts, height, width, cfg, num_steps, num_images_per_prompt)
    grid_h, grid_w = model.image_tokenizer.grid_size(height, width)
    sampler = sampler or model.sampler
    use_norm = model.config.use_norm if use_norm is None else use_norm
    guidance = guidance_for_scale(float(cfg))
    builder = model.sequences
    backbone, head = model.backbone, model.image_head
    device = next(model.parameters()).device
    dtype = next(model.backbone.parameters()).dtype

    rows = [prompt for prompt in prompts for _ in range(num_images_per_prompt)]
    num_rows, num_tokens, token_dim = len(rows), grid_h * grid_w, model.token_dim
    branches = guidance.num_branches
    texts = rows + [negative_prompt] * num_rows * (branches - 1)
    input_ids, attention_mask = builder.left_pad([builder.prompt(t, grid_h, grid_w) for t in texts])
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)  # (G*R, P)

    generators = [torch.Generator().manual_seed(seed + r) for r in range(num_rows)]
    noise = torch.stack([torch.randn(num_tokens, token_dim, generator=g) for g in generators])
    step_noise = None
    if getattr(sampler, "stochastic", False):
        steps = num_steps
        step_noise = torch.stack(
            [torch.randn(num_tokens, steps, token_dim, generator=g) for g in generators]
        ).to(device)  # (R, N, S, D)
    noise = noise.to(device)
    grid = time_grid(num_steps, shift, device=device)

    cache = backbone.new_cache(branches * num_rows, input_ids.shape[1] + num_tokens, dtype=dtype)
    positions = positions_from_mask(attention_mask)
    embeds = backbone.embed(input_ids)
    hidden = backbone(embeds, positions, attention_mask, cache)[:, -1]  # (G*R, H)
    next_positions = positions[:, -1:] + 1  # (G*R, 1)
    step_mask = torch.ones(branches * num_rows, 1, dtype=torch.bool, device=device)

    tokens = []
    for index in range(num_tokens):
        conditions = model.image_out_projector(hidden).view(branches, num_rows, -1)
        velocity = GuidedVelocity(head, conditions, guidance)
        token_noise = None if step_noise is None else step_noise[:, index].transpose(0, 1)
        token = sampler.sample(velocity, noise[:, index], grid, token_noise)  # (R, D)
        if use_norm:
            token = F.layer_norm(token, token.shape[-1:], eps=1e-6)
        tokens.append(token.float())
        if progress is not None:
            progress(index + 1, num_tokens)
        if index == num_tokens - 1:
            break
        embeds = model.image_in_projector(token.to(dtype)).repeat(branches, 1)[:, None]
        hidden = backbone(embeds, next_positions, step_mask, cache)[:, 0]
        next_positions = next_positions + 1
    return torch.stack(tokens, dim=1), grid_h, grid_w


@torch.no_grad()
def decode_tokens(model: "NextStep", tokens: torch.Tensor, grid_height: int, grid_width: int) -> torch.Tensor:
    """Tokens (R, N, D) -> images (R, 3, H, W) in [-1, 1]."""
    tokenizer = model.image_tokenizer
    reference = next(tokenizer.parameters(), None)
    if reference is not None:
        tokens = tokens.to(reference.device, reference.dtype)
    latents = tokenizer.unpatchify(tokens, grid_height, grid_width)
    return tokenizer.decode(latents).float().clamp(-1, 1)


def generate(
    model: "NextStep", prompts: list[str] | str, *, return_tokens: bool = False, **kwargs
) -> list["Image.Image"] | tuple[list["Image.Image"], torch.Tensor]:
    """Generate PIL images; keyword arguments are those of `generate_tokens`.

    Args:
        return_tokens: also return the sampled tokens (R, N, D).
    """
    tokens, grid_h, grid_w = generate_tokens(model, prompts, **kwargs)
    images = to_pil(decode_tokens(model, tokens, grid_h, grid_w))
    return (images, tokens) if return_tokens else images
