import copy

import pytest
import torch

from nextstep import generate_tokens
from nextstep.backbones import positions_from_mask
from nextstep.samplers import (
    EulerSampler,
    EulerSamplerConfig,
    GuidedVelocity,
    MidpointSampler,
    MidpointSamplerConfig,
    guidance_for_scale,
    time_grid,
)

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
    (dict(cfg=float("inf")), "cfg must be a finite number >= 0, found inf"),
    (dict(temperature=float("inf")), "temperature must be a finite number >= 0, found inf"),
    (dict(shift=float("inf")), "shift must be a finite positive number, found inf"),
    (dict(num_steps=0), "num_steps"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt"),
    (dict(shift=1e-9, num_steps=2), r"shift 1e-09 crowds the 2-step grid"),
    (dict(use_norm="no"), r"use_norm must be True, False or None \(the model's setting\), found 'no'"),
    (dict(positive_prompt=123), "positive_prompt must be a str, found int 123"),
])
def test_bad_arguments_raise_clear_errors(tiny_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_model.generate(["x"], **{**dict(height=32, width=32, num_steps=1), **kwargs})


def test_empty_prompt_list_is_an_error(tiny_model):
    with pytest.raises(ValueError, match="at least one prompt"):
        tiny_model.generate([], height=32, width=32)
    with pytest.raises(ValueError, match="prompts must be a str or a list of them, found NoneType"):
        tiny_model.generate(None, height=32, width=32)
    with pytest.raises(ValueError, match="seed must be an integer, found str 'a'"):
        tiny_model.generate("x", height=32, width=32, seed="a")
    for seed in (-1, 2**64 - 1):
        with pytest.raises(ValueError, match=rf"seed must be in \[0, 2\*\*63\), found {seed}"):
            tiny_model.generate("x", height=32, width=32, seed=seed)


def test_building_or_loading_from_the_wrong_kind_of_object_says_what_is_expected():
    from nextstep import build_model, load_model

    with pytest.raises(TypeError, match="expects a ModelConfig or a preset name, found dict"):
        build_model({"backbone": {}})
    with pytest.raises(TypeError, match="load_model expects a model directory.*found NoneType"):
        load_model(None)
    with pytest.raises(ValueError, match="load_model expects a model directory.*found ''"):
        load_model("")


def test_a_folder_that_holds_no_model_does_not_hide_a_preset_or_a_shipped_model(tmp_path, monkeypatch):
    from nextstep import load_model
    from nextstep.pretrained import DEFAULT_MODEL, bundled_model_path, model_directory

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()
    (tmp_path / DEFAULT_MODEL).mkdir()
    assert load_model("tiny").config == load_model("tiny", seed=0).config
    assert model_directory(DEFAULT_MODEL) == bundled_model_path(DEFAULT_MODEL)
    assert model_directory("tiny") is None  # built from the preset
    (tmp_path / "other").mkdir()
    assert model_directory("other").resolve() == tmp_path / "other"  # loading it then names it as no model


def test_progress_callback_counts_tokens(tiny_model):
    seen = []
    generate_tokens(tiny_model, "x", height=32, width=32, num_steps=1,
                    progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


# ------------------------------------------------------------- options of the pipeline
def test_a_guidance_object_can_replace_the_cfg_number(trained_like_model):
    from nextstep.samplers import ClassifierFreeGuidance

    number, _, _ = generate_tokens(trained_like_model, ["a cat"], seed=1, **ARGS)
    args = dict(ARGS, cfg=ClassifierFreeGuidance(3.0))
    guided, _, _ = generate_tokens(trained_like_model, ["a cat"], seed=1, **args)
    torch.testing.assert_close(number, guided)
    scheduled, _, _ = generate_tokens(trained_like_model, ["a cat"], seed=1,
                                      **dict(args, cfg=ClassifierFreeGuidance(3.0, schedule="linear")))
    by_name, _, _ = generate_tokens(trained_like_model, ["a cat"], seed=1, cfg_schedule="linear_decreasing",
                                    **{k: v for k, v in ARGS.items()})
    torch.testing.assert_close(scheduled, by_name)
    assert not torch.allclose(scheduled, number)


def test_increasing_schedule_starts_unguided(trained_like_model):
    """A one-token image sits at progress 0, where ``linear_increasing`` has scale 1."""
    args = dict(ARGS, height=16, width=16)
    increasing, _, _ = generate_tokens(trained_like_model, ["a cat"], seed=2,
                                       cfg_schedule="linear_increasing", **args)
    unguided, _, _ = generate_tokens(trained_like_model, ["a cat"], seed=2, **dict(args, cfg=1.0))
    torch.testing.assert_close(increasing, unguided, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sampler", ["heun", "midpoint", "adams_bashforth", "euler_maruyama", "flow_sde", "cps"])
def test_every_sampler_generates_and_batches_like_one_at_a_time(trained_like_model, sampler):
    args = dict(ARGS, sampler=sampler)
    batched, _, _ = generate_tokens(trained_like_model, ["a", "b c d"], seed=3, **args)
    serial = torch.cat([generate_tokens(trained_like_model, [p], seed=3 + i, **args)[0]
                        for i, p in enumerate(["a", "b c d"])])
    torch.testing.assert_close(batched, serial, atol=1e-4, rtol=1e-4)
    assert torch.isfinite(batched).all()


def test_unknown_sampler_and_schedule_names_list_the_known_ones(tiny_model):
    with pytest.raises(ValueError, match=r"unknown sampler 'rk4'; known: \[.*'euler'"):
        tiny_model.generate("x", height=16, width=16, num_steps=1, sampler="rk4")
    with pytest.raises(ValueError, match=r"unknown guidance schedule 'cosine'; known: \['constant'"):
        tiny_model.generate("x", height=16, width=16, num_steps=1, cfg_schedule="cosine")


def test_temperature_scales_every_noise_draw(trained_like_model):
    cold = [generate_tokens(trained_like_model, ["a cat"], seed=seed, temperature=0.0, **ARGS)[0]
            for seed in (1, 2)]
    torch.testing.assert_close(cold[0], cold[1])
    warm, _, _ = generate_tokens(trained_like_model, ["a cat"], seed=1, temperature=1.0, **ARGS)
    assert not torch.allclose(warm, cold[0])
    with pytest.raises(ValueError, match="temperature"):
        generate_tokens(trained_like_model, ["a"], temperature=-1.0, **ARGS)


def test_per_position_step_schedules(trained_like_model):
    from nextstep.samplers import LinearSteps

    constant, _, _ = generate_tokens(trained_like_model, ["a cat"], seed=1, **ARGS)
    same, _, _ = generate_tokens(trained_like_model, ["a cat"], seed=1,
                                 **dict(ARGS, num_steps=LinearSteps(3, 3)))
    torch.testing.assert_close(constant, same)
    seen = []
    sampler = model_sampler_recording_steps(seen)
    generate_tokens(trained_like_model, ["a cat"], seed=1, sampler=sampler,
                    **dict(ARGS, num_steps=LinearSteps(6, 2)))
    assert seen[0] == 6 and seen[-1] == 2 and seen == sorted(seen, reverse=True) and len(seen) == 6
    stochastic = generate_tokens(trained_like_model, ["a", "b"], seed=1, sampler="flow_sde",
                                 **dict(ARGS, num_steps=LinearSteps(4, 1)))[0]
    alone = generate_tokens(trained_like_model, ["b"], seed=2, sampler="flow_sde",
                            **dict(ARGS, num_steps=LinearSteps(4, 1)))[0]
    torch.testing.assert_close(stochastic[1:], alone, atol=1e-4, rtol=1e-4)


def test_a_step_count_the_sampler_refuses_is_named_before_any_token(tiny_model):
    from nextstep.fast import FastTokenSampler
    from nextstep.samplers import LinearSteps

    for token_sampler in (None, FastTokenSampler(tiny_model, use_kernels=False)):
        done = []
        with pytest.raises(ValueError, match="num_steps must be >= 2 when last_step_size > 0"):
            generate_tokens(tiny_model, ["a"], height=32, width=32, sampler="euler_maruyama", cfg=3.0,
                            num_steps=LinearSteps(4, 1), token_sampler=token_sampler,
                            progress=lambda index, total: done.append(index))
        assert done == []


def model_sampler_recording_steps(seen):
    from nextstep.samplers import EulerSampler

    class Recording(EulerSampler):
        def sample(self, velocity_fn, noise, time_grid, step_noise=None):
            seen.append(time_grid.shape[0] - 1)
            return super().sample(velocity_fn, noise, time_grid, step_noise)

    return Recording()


def test_positive_prompt_is_appended_to_the_conditional_prompts(trained_like_model):
    suffixed, _, _ = generate_tokens(trained_like_model, ["a cat"], seed=1, positive_prompt="best quality",
                                     **ARGS)
    written, _, _ = generate_tokens(trained_like_model, ["a cat best quality"], seed=1, **ARGS)
    torch.testing.assert_close(suffixed, written)


def test_third_party_samplers_without_evaluation_times_still_work(trained_like_model):
    from nextstep.samplers import Sampler

    class Ralston(Sampler):
        """A second-order Runge-Kutta method that declares no evaluation times."""

        order, evaluations_per_step = 2, 2

        def sample(self, velocity_fn, noise, time_grid, step_noise=None):
            x = noise
            for t0, t1 in zip(time_grid[:-1], time_grid[1:]):
                dt = t1 - t0
                k1 = velocity_fn(x, t0.expand(x.shape[0]))
                k2 = velocity_fn(x + 2 / 3 * dt * k1, (t0 + 2 / 3 * dt).expand(x.shape[0]))
                x = x + dt * (k1 / 4 + 3 * k2 / 4)
            return x

    tokens, _, _ = generate_tokens(trained_like_model, ["a cat"], seed=1, sampler=Ralston(), **ARGS)
    assert torch.isfinite(tokens).all()


class _MidpointWithAnEulersPromise(MidpointSampler):
    """Evaluates at the midpoints too, but promises the grid's start times only."""

    def evaluation_times(self, time_grid):
        return time_grid[:-1]


class _EulerPromisingItsFirstTime(EulerSampler):
    """Evaluates past the one time it promises (beyond the head's table)."""

    def evaluation_times(self, time_grid):
        return time_grid[:1]


@pytest.mark.parametrize("token_sampler", ["loop", "fast"])
@pytest.mark.parametrize("sampler", [_MidpointWithAnEulersPromise(MidpointSamplerConfig()),
                                     _EulerPromisingItsFirstTime(EulerSamplerConfig())])
def test_a_sampler_that_breaks_its_evaluation_times_promise_is_named_before_a_token_is_kept(trained_like_model,
                                                                                          token_sampler, sampler):
    from nextstep.fast.token_sampler import token_sampler_named

    sampled = []
    runner = token_sampler_named(trained_like_model, token_sampler)
    name = type(sampler).__name__
    with pytest.raises(ValueError, match=rf"{name}.evaluation_times promised the velocity at \[0.0.*\] on a grid of "
                                         r"2 step\(s\), but sample evaluates it at \[.*\] too; return every time"):
        generate_tokens(trained_like_model, ["a cat"], seed=1, sampler=sampler,
                        progress=lambda done, total: sampled.append(done), token_sampler=runner,
                        **{**ARGS, "num_steps": 2})
    assert not sampled


def test_progress_bar_and_returned_tokens(tiny_model, capsys):
    images, tokens = tiny_model.generate("x", height=16, width=32, num_steps=1, progress=True,
                                         return_tokens=True)
    assert tokens.shape == (1, 2, 64) and images[0].size == (32, 16)
    assert not tokens.is_inference()  # an ordinary tensor, usable with autograd and in place
    tokens += 1
    assert "2/2" in capsys.readouterr().err


def test_guidance_object_with_three_branches_needs_images(tiny_model):
    from nextstep.samplers import ImageEditingGuidance

    with pytest.raises(ValueError, match="needs input images"):
        tiny_model.generate("x", height=16, width=16, num_steps=1, cfg=ImageEditingGuidance(2.0, 2.0))


# ------------------------------------------------------------- the model's own defaults
def test_unset_sampling_arguments_come_from_the_models_generation_defaults(trained_like_model):
    from nextstep.generation_defaults import GenerationDefaults

    model = trained_like_model
    model.config = model.config.replace(generation=GenerationDefaults(
        cfg=2.0, cfg_schedule="linear_increasing", num_steps=3, height=32, width=48))
    implicit, grid_h, grid_w = generate_tokens(model, ["a cat"], seed=4)
    explicit, _, _ = generate_tokens(model, ["a cat"], seed=4, cfg=2.0, cfg_schedule="linear_increasing",
                                     num_steps=3, height=32, width=48)
    assert (grid_h, grid_w) == model.image_tokenizer.grid_size(32, 48)
    assert torch.equal(implicit, explicit)
    constant, _, _ = generate_tokens(model, ["a cat"], seed=4, cfg_schedule="constant")
    assert not torch.allclose(constant, implicit)  # an explicit argument wins


def test_release_defaults_apply_without_model_settings(tiny_model):
    defaults = tiny_model.config.generation
    assert (defaults.cfg, defaults.cfg_schedule, defaults.num_steps, defaults.height, defaults.width) == \
        (7.5, "constant", 50, 256, 256)


@pytest.mark.parametrize("changes, match", [
    (dict(cfg=-1.0), "cfg"),
    (dict(cfg=float("inf")), "cfg"),
    (dict(cfg_schedule="cosine"), "guidance schedule"),
    (dict(num_steps=0), "num_steps"),
    (dict(height=2.5), "height"),
])
def test_bad_generation_defaults_are_refused(changes, match):
    from nextstep.generation_defaults import GenerationDefaults

    with pytest.raises(ValueError, match=match):
        GenerationDefaults(**changes)


def test_overridden_generation_defaults_keep_what_is_not_given():
    from nextstep.generation_defaults import GenerationDefaults

    tuned = GenerationDefaults(cfg=4.0, num_steps=20, height=64, width=64)
    assert tuned.overridden(cfg=None, cfg_schedule="linear_increasing", num_steps=None) == GenerationDefaults(
        cfg=4.0, cfg_schedule="linear_increasing", num_steps=20, height=64, width=64)
    with pytest.raises(ValueError, match="num_steps"):
        tuned.overridden(num_steps=0)


def test_a_sampling_that_diverges_is_named_not_kept(tiny_model):
    head = copy.deepcopy(tiny_model)
    for parameter in head.image_head.parameters():  # a head whose velocities are huge
        torch.nn.init.constant_(parameter, 1e30)
    with pytest.warns(RuntimeWarning, match=r"tokens of image\(s\) \[0\] are not finite: sampling diverged "
                                           r"with cfg 2.0, temperature 1.0, shift 1.0, steps 2"):
        generate_tokens(head, ["a"], height=32, width=32, cfg=2.0, num_steps=2, seed=0)


def test_the_command_line_refuses_to_save_a_diverged_image(tmp_path, tiny_model, capsys):
    from nextstep.cli import main

    head = copy.deepcopy(tiny_model)
    for parameter in head.image_head.parameters():
        torch.nn.init.constant_(parameter, 1e30)
    head.save_pretrained(tmp_path / "model")
    with pytest.warns(RuntimeWarning):
        assert main(["generate", "a", "--model", str(tmp_path / "model"), "--steps", "2", "--height", "32",
                     "--width", "32", "--output", str(tmp_path / "out"), "--quiet"]) == 1  # a run that diverged
    assert "the tokens of 'a' are not finite: sampling diverged" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.png"))


def test_resolved_settings_are_the_defaults_a_call_draws_with(tiny_model):
    from nextstep.generation import resolved_settings

    plain = resolved_settings(tiny_model)
    defaults = tiny_model.config.generation
    assert plain == {"cfg": defaults.cfg, "cfg_schedule": defaults.cfg_schedule, "num_steps": defaults.num_steps,
                     "shift": 1.0, "sampler": tiny_model.config.sampler.type, "temperature": 1.0, "cfg_img": None,
                     "candidates": defaults.candidates, "candidate_score": defaults.candidate_score,
                     "negative_prompt": ""}
    editing = resolved_settings(tiny_model, editing=True)
    assert (editing["shift"], editing["cfg_img"], editing["negative_prompt"], editing["candidates"]) == \
        (3.2, 2.0, "Copy original image.", 1)
    given = resolved_settings(tiny_model, cfg=3.0, num_steps=2, shift=2.0, sampler="heun", temperature=0.5)
    assert (given["cfg"], given["num_steps"], given["shift"], given["sampler"], given["temperature"]) == \
        (3.0, 2, 2.0, "heun", 0.5)
    # A call that leaves them out draws what a call that names them draws.
    options = {key: value for key, value in plain.items() if key != "sampler"}
    options["num_steps"] = 2
    named = generate_tokens(tiny_model, ["a red circle"], height=32, width=32, seed=1, **options)[0]
    default = generate_tokens(tiny_model, ["a red circle"], height=32, width=32, seed=1, num_steps=2)[0]
    assert torch.equal(named, default)


@pytest.mark.parametrize("negative", [123, ["blurry"]])
def test_a_negative_prompt_that_is_not_text_is_named(tiny_model, negative):
    with pytest.raises(ValueError, match=r"negative_prompt must be a str \(or None for the default\), found "):
        generate_tokens(tiny_model, ["a"], num_steps=2, negative_prompt=negative)


@pytest.mark.parametrize("sampler", ["euler_maruyama", "flow_sde"])
def test_temperature_zero_silences_the_step_noise_of_stochastic_samplers(trained_like_model, sampler):
    cold = [generate_tokens(trained_like_model, ["a cat"], seed=seed, temperature=0.0, sampler=sampler, **ARGS)[0]
            for seed in (1, 2)]
    torch.testing.assert_close(cold[0], cold[1], rtol=0, atol=0)
    warm = [generate_tokens(trained_like_model, ["a cat"], seed=seed, temperature=1.0, sampler=sampler, **ARGS)[0]
            for seed in (1, 2)]
    assert not torch.allclose(warm[0], warm[1])


def test_an_image_with_a_single_non_finite_value_is_named(tiny_model):
    from nextstep.samplers import EulerSampler

    calls = []

    class OneNaN(EulerSampler):
        """Euler, but the last token of the second image gets one NaN entry."""

        def sample(self, velocity_fn, noise, time_grid, step_noise=None):
            calls.append(None)
            x = super().sample(velocity_fn, noise, time_grid, step_noise)
            if len(calls) == 4:  # a 32x32 image is 2x2 tokens: the fourth call samples the last token
                x = x.clone()
                x[1, 0] = float("nan")
            return x

    with pytest.warns(RuntimeWarning, match=r"tokens of image\(s\) \[1\] are not finite"):
        tokens, _, _ = generate_tokens(tiny_model, ["a", "b"], height=32, width=32, cfg=2.0, num_steps=2, seed=0,
                                       sampler=OneNaN(), candidates=1)
    assert int((~torch.isfinite(tokens)).sum()) == 1 and torch.isfinite(tokens[0]).all()


def test_a_decoder_kept_in_another_dtype_than_the_encoder_decodes_generated_tokens(tiny_model):
    from nextstep.generation import decode_tokens

    tokens = torch.randn(1, 4, tiny_model.image_tokenizer.token_dim)
    expected = decode_tokens(tiny_model, tokens, 2, 2)
    tiny_model.image_tokenizer.decoder.to(torch.bfloat16)
    images = decode_tokens(tiny_model, tokens, 2, 2)
    assert images.dtype == torch.float32 and images.shape == expected.shape
    torch.testing.assert_close(images, expected, atol=0.05, rtol=0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(seed=True), "seed must be an integer, found bool True"),
    (dict(num_images_per_prompt=True), "num_images_per_prompt must be an integer >= 1, found True"),
    (dict(shift=0), "shift must be a finite positive number, found 0"),
    (dict(shift=False), "shift must be a finite positive number, found False"),
    (dict(cfg_img=1.0), "cfg_img is the image guidance of editing; it needs input images"),
])
def test_arguments_of_the_wrong_kind_or_outside_their_range_are_refused(tiny_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate_tokens(tiny_model, ["x"], **{**dict(height=32, width=32, num_steps=2), **kwargs})


def test_an_image_guidance_scale_beside_a_guidance_object_is_refused(tiny_model):
    from nextstep.samplers import ClassifierFreeGuidance

    with pytest.raises(ValueError, match="pass cfg_img inside the guidance object when cfg is a Guidance"):
        generate_tokens(tiny_model, ["x"], images=torch.zeros(1, 3, 32, 32), num_steps=2,
                        cfg=ClassifierFreeGuidance(2.0), cfg_img=2.0)


def test_decoded_images_are_clamped_to_the_pixel_range(tiny_model):
    from nextstep.generation import decode_tokens

    tokens = 50 * torch.randn(2, 4, tiny_model.image_tokenizer.token_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        raw = tiny_model.image_tokenizer.decode(tiny_model.image_tokenizer.unpatchify(tokens, 2, 2))
    assert raw.abs().max() > 1
    images = decode_tokens(tiny_model, tokens, 2, 2)
    assert images.shape == raw.shape and images.min() >= -1 and images.max() <= 1
    torch.testing.assert_close(images, raw.clamp(-1, 1))


def test_the_candidate_score_left_unset_is_the_model_s(tiny_model):
    from nextstep.generation import resolved_settings

    tiny_model.config = tiny_model.config.replace(
        generation=tiny_model.config.generation.replace(candidate_score="caption"))
    assert resolved_settings(tiny_model)["candidate_score"] == "caption"
    assert resolved_settings(tiny_model, candidate_score="flow")["candidate_score"] == "flow"


def test_generation_defaults_take_a_cfg_of_zero_and_refuse_a_boolean():
    from nextstep.generation_defaults import GenerationDefaults

    assert GenerationDefaults(cfg=0.0).cfg == 0.0
    assert GenerationDefaults(cfg=0).cfg == 0
    with pytest.raises(ValueError, match="cfg"):
        GenerationDefaults(cfg=True)
