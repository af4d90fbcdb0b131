import pytest
import torch

from nextstep import generate_tokens
from nextstep.backbones import positions_from_mask
from nextstep.samplers import GuidedVelocity, guidance_for_scale, time_grid

ARGS = dict(height=32, width=48, num_steps=3, cfg=3.0)


def test_generate_returns_pil_images_of_the_requested_size(tiny_model):
    images = tiny_model.generate(["a red circle", "b"], height=32, width=48, num_steps=2,
                                 num_images_per_prompt=2)
    assert len(images) == 4
    assert all(image.size == (48, 32) and image.mode == "RGB" for image in images)


def test_seeded_generation_is_deterministic(trained_like_model):
    first, _, _ = generate_tokens(trained_like_model, ["a cat"], seed=7, **ARGS)
    second, _, _ = generate_tokens(trained_like_model, ["a cat"], seed=7, **ARGS)
    other, _, _ = generate_tokens(trained_like_model, ["a cat"], seed=8, **ARGS)
    assert torch.equal(first, second)
    assert not torch.allclose(first, other)


def test_batched_generation_equals_one_at_a_time(trained_like_model):
    model = trained_like_model
    batched, _, _ = generate_tokens(model, ["a", "a much longer prompt"], seed=3,
                                    num_images_per_prompt=2, negative_prompt="bad", **ARGS)
    serial = [
        generate_tokens(model, ["a"], seed=3, num_images_per_prompt=2, negative_prompt="bad", **ARGS)[0],
        generate_tokens(model, ["a much longer prompt"], seed=5, num_images_per_prompt=2,
                        negative_prompt="bad", **ARGS)[0],
    ]
    torch.testing.assert_close(batched, torch.cat(serial), atol=1e-4, rtol=1e-4)


def reference_generation(model, prompt, negative, seed, height, width, num_steps, cfg):
    """Generation without a KV cache: the whole sequence is recomputed for every token."""
    builder = model.sequences
    grid_h, grid_w = model.image_tokenizer.grid_size(height, width)
    count = grid_h * grid_w
    guidance = guidance_for_scale(cfg)
    prompts = [builder.prompt(prompt, grid_h, grid_w), builder.prompt(negative, grid_h, grid_w)]
    ids, mask = builder.left_pad(prompts[: guidance.num_branches])
    noise = torch.randn(count, model.token_dim, generator=torch.Generator().manual_seed(seed))
    tokens = []
    for index in range(count):
        branches = ids.shape[0]
        previous = torch.stack(tokens) if tokens else torch.zeros(0, model.token_dim)
        image_embeds = model.image_in_projector(previous)[None].expand(branches, -1, -1)
        embeds = torch.cat([model.backbone.embed(ids), image_embeds], 1)
        full_mask = torch.cat([mask, torch.ones(branches, len(tokens), dtype=torch.bool)], 1)
        hidden = model.backbone(embeds, positions_from_mask(full_mask), full_mask)[:, -1]
        conditions = model.image_out_projector(hidden)[:, None]
        velocity = GuidedVelocity(model.image_head, conditions, guidance)
        tokens.append(model.sampler.sample(velocity, noise[index][None], time_grid(num_steps))[0])
    return torch.stack(tokens)


@torch.no_grad()
def test_cached_generation_equals_uncached(trained_like_model):
    cached, _, _ = generate_tokens(trained_like_model, ["a cat"], negative_prompt="a dog", seed=2, **ARGS)
    reference = reference_generation(trained_like_model, "a cat", "a dog", 2, **ARGS)
    torch.testing.assert_close(cached[0], reference, atol=1e-4, rtol=1e-4)


def test_cfg_one_skips_the_unconditional_branch(trained_like_model):
    args = dict(ARGS, cfg=1.0)
    tokens, _, _ = generate_tokens(trained_like_model, ["a cat"], negative_prompt="x", seed=1, **args)
    reference = reference_generation(trained_like_model, "a cat", "x", 1, **args)
    torch.testing.assert_close(tokens[0], reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(height=40), "multiple of 16"),
    (dict(width=0), "multiple of 16"),
    (dict(cfg=-1.0), "cfg"),
    (dict(num_steps=0), "num_steps"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt"),
])
def test_bad_arguments_raise_clear_errors(tiny_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_model.generate(["x"], **{**dict(height=32, width=32, num_steps=1), **kwargs})


def test_empty_prompt_list_is_an_error(tiny_model):
    with pytest.raises(ValueError, match="at least one prompt"):
        tiny_model.generate([], height=32, width=32)


def test_progress_callback_counts_tokens(tiny_model):
    seen = []
    generate_tokens(tiny_model, "x", height=32, width=32, num_steps=1,
                    progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
