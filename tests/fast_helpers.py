"""Prefill and noise the way `nextstep.generation.generate_tokens` prepares them, for the fast-path tests."""

from __future__ import annotations

import torch

from nextstep.backbones.base import positions_from_mask


def prefill(model, prompts: list[str], grid: tuple[int, int], branches: int, cache_factory=None):
    """Text-to-image prefill: rows ``[prompts; negative prompts ""]`` (the first ``branches`` of them).

    Returns:
        hidden (G*R, H), the cache, next positions (G*R, 1).
    """
    builder = model.sequences
    rows = [builder.prompt(prompt if branch == 0 else "", *grid) for branch in range(branches) for prompt in prompts]
    input_ids, mask = builder.left_pad(rows)
    device = next(model.parameters()).device
    input_ids, mask = input_ids.to(device), mask.to(device)
    embeds = model.backbone.embed(input_ids)
    factory = cache_factory or model.backbone.new_cache
    cache = factory(len(rows), input_ids.shape[1] + grid[0] * grid[1])
    positions = positions_from_mask(mask)
    with torch.no_grad():
        hidden = model.backbone(embeds, positions, mask, cache)[:, -1]
    return hidden, cache, positions[:, -1:] + 1


def draw_noise(num_images: int, seed: int, num_tokens: int, token_dim: int, max_steps: int, stochastic: bool):
    """Per-image generators seeded ``seed + r``: noise (R, T, D) and step noise (T, S, R, D) or None."""
    generators = [torch.Generator().manual_seed(seed + r) for r in range(num_images)]
    noise = torch.stack([torch.randn(num_tokens, token_dim, generator=g) for g in generators])
    step_noise = None
    if stochastic:
        step_noise = torch.stack(
            [torch.randn(num_tokens, max_steps, token_dim, generator=g) for g in generators], dim=2)
    return noise, step_noise


def fast_sample(model, fast, sampler, prompts, grid: tuple[int, int], *, cfg: float = 3.0, steps: int = 2,
                seed: int = 0, use_norm: bool | None = True, **options):
    """Tokens (R, h*w, D) of ``prompts`` from the fast sampler ``fast``, with ``guidance_for_scale(cfg)``,
    ``steps`` head steps and ``use_norm``, from the prefill and noise `generate_tokens` would use; ``options``
    go on to ``sample_tokens``."""
    from nextstep.samplers import guidance_for_scale

    guidance = guidance_for_scale(cfg)
    hidden, cache, next_positions = prefill(model, list(prompts), grid, guidance.num_branches, fast.new_cache)
    count = grid[0] * grid[1]
    noise, step_noise = draw_noise(len(prompts), seed, count, model.token_dim, steps, sampler.stochastic)
    return fast.sample_tokens(hidden, cache, next_positions, noise.to(fast.device),
                              None if step_noise is None else step_noise.to(fast.device), guidance=guidance,
                              sampler=sampler, num_steps=steps, use_norm=use_norm, **options)
