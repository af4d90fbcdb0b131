"""Image editing: the sequence format, training examples and three-branch generation."""

import pytest
import torch

from nextstep import generate_tokens
from nextstep.samplers import ClassifierFreeGuidance, GuidedVelocity, ImageEditingGuidance, time_grid

ARGS = dict(num_steps=2, cfg=3.0, cfg_img=2.0, shift=1.0, negative_prompt="keep it")


def source_images(count, height=32, width=48, seed=0):
    return torch.rand(count, 3, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_editing_prompt_layout(tiny_model):
    builder, tok = tiny_model.sequences, tiny_model.text_tokenizer
    ids, start = builder.editing_prompt("make it blue", (2, 3), 4, 5)
    assert ids[:start] == builder.image_prefix(2, 3)
    assert ids[start:start + 6] == [tok.image_placeholder_id] * 6
    assert ids[start + 6] == tok.end_of_image_id
    assert ids[start + 7:] == tok.encode("make it blue") + builder.image_prefix(4, 5)


def test_editing_example_puts_the_loss_on_the_edited_image_only(tiny_model):
    builder, tok = tiny_model.sequences, tiny_model.text_tokenizer
    source, target = torch.randn(6, 64), torch.randn(4, 64)
    example = builder.editing_example("make it blue", source, (2, 3), target, (2, 2))
    plain = builder.example("a cat", torch.randn(4, 64), 2, 2)
    batch = builder.collate([example, plain])
    row = batch.input_ids[0]
    assert int(batch.image_mask[0].sum()) == 10 and int(batch.image_target_mask[0].sum()) == 4
    source_positions = batch.image_mask[0] & ~batch.image_target_mask[0]
    torch.testing.assert_close(batch.image_tokens[0][source_positions], source)
    torch.testing.assert_close(batch.image_tokens[0][batch.image_target_mask[0]], target)
    assert (row[batch.image_mask[0]] == tok.image_placeholder_id).all()
    assert not (batch.text_target_mask & batch.image_mask).any()
    assert row[len(example.input_ids) - 1] == tok.eos_id
    # The single-image example is unchanged by the multi-image support.
    assert int(batch.image_target_mask[1].sum()) == 4 and int(batch.image_mask[1].sum()) == 4
    with pytest.raises(ValueError, match=r"source_tokens must have shape \(6, 64\)"):
        builder.editing_example("x", torch.randn(5, 64), (2, 3), target, (2, 2))


def test_editing_examples_train_on_the_target_tokens(tiny_model):
    builder = tiny_model.sequences
    batch = builder.collate([builder.editing_example("blue", torch.randn(4, 64), (2, 2), torch.randn(4, 64),
                                                     (2, 2))])
    losses = tiny_model(batch, generator=torch.Generator().manual_seed(0))
    assert losses.num_image_tokens == 4 and torch.isfinite(losses.total)


def test_editing_generates_images_of_the_source_size(tiny_model):
    images = tiny_model.generate(["make it blue", "make it red"], images=source_images(2), **ARGS)
    assert [image.size for image in images] == [(48, 32), (48, 32)]
    from PIL import Image

    pil = Image.new("RGB", (32, 16), "green")
    images = tiny_model.generate("make it blue", images=pil, **ARGS)
    assert images[0].size == (32, 16)


def test_batched_editing_equals_one_at_a_time(trained_like_model):
    sources = source_images(2)
    prompts = ["blue", "a much longer instruction"]
    batched, _, _ = generate_tokens(trained_like_model, prompts, images=sources, seed=4,
                                    num_images_per_prompt=2, **ARGS)
    serial = [generate_tokens(trained_like_model, [prompts[i]], images=sources[i:i + 1], seed=4 + 2 * i,
                              num_images_per_prompt=2, **ARGS)[0] for i in range(2)]
    torch.testing.assert_close(batched, torch.cat(serial), atol=1e-4, rtol=1e-4)



def test_a_sampled_source_posterior_follows_the_seed_not_the_batch(trained_like_model):
    """With a tokenizer that samples its latents, a source image is encoded from its prompt's seed: the same
    call gives the same images, and a batch the images of its prompts edited alone; captions likewise."""
    from nextstep.text_generation import caption_images

    tokenizer = trained_like_model.image_tokenizer
    config = tokenizer.config
    tokenizer.config = config.replace(deterministic=False)
    try:
        assert tokenizer.samples_latents
        sources = source_images(2)
        prompts = ["blue", "a much longer instruction"]
        batched, _, _ = generate_tokens(trained_like_model, prompts, images=sources, seed=4,
                                        num_images_per_prompt=2, **ARGS)
        torch.manual_seed(123)  # the global generator moves between the calls
        again, _, _ = generate_tokens(trained_like_model, prompts, images=sources, seed=4,
                                      num_images_per_prompt=2, **ARGS)
        torch.testing.assert_close(batched, again)
        serial = [generate_tokens(trained_like_model, [prompts[i]], images=sources[i:i + 1], seed=4 + 2 * i,
                                  num_images_per_prompt=2, **ARGS)[0] for i in range(2)]
        torch.testing.assert_close(batched, torch.cat(serial), atol=1e-4, rtol=1e-4)
        captions = caption_images(trained_like_model, sources, seed=7, max_new_tokens=4, temperature=1.0)
        alone = caption_images(trained_like_model, sources[1:], seed=8, max_new_tokens=4, temperature=1.0)
        assert captions.ids[1] == alone.ids[0]
    finally:
        tokenizer.config = config

def reference_editing(model, instruction, source, negative, seed, num_steps, cfg, cfg_img):
    """Editing without a KV cache: every branch's whole sequence is recomputed for each token."""
    builder = model.sequences
    tokens_in, grid_h, grid_w = model.encode_images(source)
    spans = []
    rows = []
    for text, with_image in ((instruction, True), (negative, True), (negative, False)):
        if with_image:
            ids, start = builder.editing_prompt(text, (grid_h, grid_w), grid_h, grid_w)
        else:
            ids, start = builder.prompt(text, grid_h, grid_w), None
        rows.append(ids)
        spans.append(start)
    count = grid_h * grid_w
    noise = torch.randn(count, model.token_dim, generator=torch.Generator().manual_seed(seed))
    guidance = ImageEditingGuidance(cfg, cfg_img)
    tokens = []
    for index in range(count):
        hidden = []
        for ids, start in zip(rows, spans):
            image_mask = torch.zeros(len(ids) + index, dtype=torch.bool)
            image_tokens = torch.zeros(len(ids) + index, model.token_dim)
            if start is not None:
                image_mask[start:start + count] = True
                image_tokens[start:start + count] = tokens_in[0]
            image_mask[len(ids):] = True
            if tokens:
                image_tokens[len(ids):] = torch.stack(tokens)
            input_ids = torch.tensor(ids + [0] * index)[None]
            embeds = model.embed(input_ids, image_mask[None], image_tokens[None])
            positions = torch.arange(input_ids.shape[1])[None]
            hidden.append(model.backbone(embeds, positions)[0, -1])
        conditions = model.image_out_projector(torch.stack(hidden))[:, None]  # (3, 1, H)
        velocity = GuidedVelocity(model.image_head, conditions, guidance)
        tokens.append(model.sampler.sample(velocity, noise[index][None], time_grid(num_steps))[0])
    return torch.stack(tokens)


@torch.no_grad()
def test_cached_editing_equals_uncached(trained_like_model):
    source = source_images(1, 32, 32, seed=3)
    cached, _, _ = generate_tokens(trained_like_model, ["blue"], images=source, seed=5, **ARGS)
    reference = reference_editing(trained_like_model, "blue", source, "keep it", 5, 2, 3.0, 2.0)
    torch.testing.assert_close(cached[0], reference, atol=1e-4, rtol=1e-4)


def test_image_scale_one_drops_the_third_branch(trained_like_model):
    source = source_images(1)
    args = dict(ARGS, cfg_img=1.0)
    two_way, _, _ = generate_tokens(trained_like_model, ["blue"], images=source, **args)
    explicit, _, _ = generate_tokens(trained_like_model, ["blue"], images=source,
                                     **dict(ARGS, cfg=ClassifierFreeGuidance(3.0), cfg_img=None))
    torch.testing.assert_close(two_way, explicit)


def test_the_source_image_conditions_the_result(trained_like_model):
    first, _, _ = generate_tokens(trained_like_model, ["blue"], images=source_images(1, seed=0), **ARGS)
    second, _, _ = generate_tokens(trained_like_model, ["blue"], images=source_images(1, seed=1), **ARGS)
    assert not torch.allclose(first, second)


@pytest.mark.parametrize("kwargs, match", [
    (dict(cfg_img=2.0), "needs input images"),
    (dict(cfg=ImageEditingGuidance(3.0, 2.0)), "needs input images"),
    (dict(images=torch.zeros(2, 3, 32, 32)), "one input image per prompt"),
    (dict(images=[torch.zeros(3, 32, 32), torch.zeros(3, 16, 32)]), "differ in size"),
    (dict(images="photo.png"), "PIL images or a"),
    (dict(images=torch.zeros(1, 3, 40, 32)), "multiple of 16"),
    (dict(images=[torch.zeros(1, 3, 32, 32), 7]), "found a int among them"),
])
def test_bad_editing_arguments_raise_clear_errors(tiny_model, kwargs, match):
    prompts = ["a", "b"] if isinstance(kwargs.get("images"), list) else ["a"]
    with pytest.raises(ValueError, match=match):
        tiny_model.generate(prompts, num_steps=1, **kwargs)


def test_command_line_edits_an_image(tmp_path, capsys):
    from PIL import Image

    from nextstep.cli import main

    Image.new("RGB", (32, 16), "red").save(tmp_path / "source.png")
    code = main(["generate", "make it blue", "--image", str(tmp_path / "source.png"), "--steps", "1",
                 "--sampler", "midpoint", "--cfg-schedule", "linear", "--output", str(tmp_path / "out"),
                 "--quiet"])
    assert code == 0
    written = capsys.readouterr().out.split()
    assert len(written) == 1 and Image.open(written[0]).size == (32, 16)
    assert main(["generate", "x", "--sampler", "rk9", "--output", str(tmp_path), "--quiet"]) == 2
    error = capsys.readouterr().err
    assert "unknown sampler 'rk9'; known: [" in error and "'euler'" in error


def test_editing_defaults_are_the_releases(trained_like_model):
    """Unset, editing guides with cfg_img 2.0, shift 3.2 and the negative prompt "Copy original image."."""
    source = source_images(1)
    common = dict(images=source, seed=3, num_steps=3, cfg=4.0)
    defaults, _, _ = generate_tokens(trained_like_model, ["make it blue"], **common)
    spelled, _, _ = generate_tokens(trained_like_model, ["make it blue"], cfg_img=2.0, shift=3.2,
                                    negative_prompt="Copy original image.", **common)
    torch.testing.assert_close(defaults, spelled, atol=0, rtol=0)
    for change in (dict(cfg_img=1.5), dict(shift=1.0), dict(negative_prompt="")):
        other, _, _ = generate_tokens(trained_like_model, ["make it blue"], **{
            "cfg_img": 2.0, "shift": 3.2, "negative_prompt": "Copy original image.", **change}, **common)
        assert not torch.equal(defaults, other), f"{change} made no difference"
