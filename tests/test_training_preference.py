"""Preference training: near-miss pairs, the DPO loss on flow errors, recipes."""

import json
import math
import random

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nextstep import build_model
from nextstep.training.data import (
    ImageTextSample,
    PreferenceManifestDataset,
    ShapesPreferencesDataset,
    build_latent_cache,
    collate_samples,
    near_miss_scene,
)
from nextstep.training.data.buckets import AspectRatioBuckets
from nextstep.training.data.preferences import PreferenceManifestConfig, ShapesPreferencesConfig
from nextstep.training.data.shapes.captions import true_captions
from nextstep.training.data.shapes.metadata import SCENE_KINDS
from nextstep.training.data.shapes.world import sample_scene
from nextstep.training.preference import PreferenceTask
from nextstep.training.recipe import RecipeConfig
from nextstep.training.text_to_image import TextToImageTask


@given(kind=st.sampled_from(SCENE_KINDS), seed=st.integers(0, 10**6))
def test_a_near_miss_fails_the_caption_its_scene_states(kind, seed):
    rng = random.Random(seed)
    scene = sample_scene(rng, kind)
    miss = near_miss_scene(rng, scene)
    if miss is None:
        return
    assert scene.caption in true_captions(scene)
    assert scene.caption not in true_captions(miss)
    assert miss.caption in true_captions(miss)
    # One edit: the shapes differ in one object, or the count by one, or colours or places swap.
    assert abs(len(miss.objects) - len(scene.objects)) <= 1


def test_the_dataset_pairs_every_kind_deterministically():
    dataset = ShapesPreferencesDataset(ShapesPreferencesConfig(num_samples=200, size=32))
    pairs = [dataset.pair(i) for i in range(200)]
    assert {scene.kind for scene, _ in pairs} == set(SCENE_KINDS)
    assert [s.caption for s, _ in pairs] == [dataset.pair(i)[0].caption for i in range(200)]
    sample = dataset.load(0)
    assert sample.caption == dataset.caption(0) == pairs[0][0].caption
    assert sample.image.size == sample.rejected_image.size == (32, 32)
    assert sample.metadata["rejected"]["caption"] == pairs[0][1].caption


def test_batches_carry_the_rejected_images_and_refuse_mixtures(tmp_path):
    dataset = ShapesPreferencesDataset(ShapesPreferencesConfig(num_samples=4, size=32))
    samples = [dataset.load(i) for i in range(3)]
    batch = collate_samples(samples, 32, 32)
    assert batch.is_preference and batch.rejected_images.shape == (3, 3, 32, 32)
    assert not torch.equal(batch.images, batch.rejected_images)
    plain = ImageTextSample(key="plain", caption="a circle", image=samples[0].image)
    with pytest.raises(ValueError, match=r"mixes samples without a rejected image: \['plain'\]"):
        collate_samples(samples + [plain], 32, 32)
    with pytest.raises(ValueError, match="holds preference samples; latent caches"):
        build_latent_cache(build_model("tiny", seed=0).image_tokenizer, dataset,
                           AspectRatioBuckets(32, multi_aspect=False), tmp_path / "cache")


def test_the_manifest_reads_pairs_and_names_bad_lines(tmp_path):
    dataset = ShapesPreferencesDataset(ShapesPreferencesConfig(num_samples=2, size=32))
    sample = dataset.load(0)
    sample.image.save(tmp_path / "good.png")
    sample.rejected_image.save(tmp_path / "bad.png")
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text(json.dumps({"caption": f" {sample.caption}\n", "chosen": "good.png", "rejected": "bad.png"})
                        + "\n")  # blanks around a caption go, as in every other source
    pairs = PreferenceManifestDataset(PreferenceManifestConfig(str(manifest)))
    loaded = pairs.load(0)
    assert (len(pairs), loaded.caption, pairs.image_size(0)) == (1, sample.caption, (32, 32))
    assert loaded.rejected_image.size == (32, 32)
    manifest.write_text(json.dumps({"caption": "x", "chosen": "good.png"}) + "\n")
    with pytest.raises(ValueError, match=r"line 1: missing or non-string \['rejected'\]"):
        PreferenceManifestDataset(PreferenceManifestConfig(str(manifest)))
    with pytest.raises(FileNotFoundError, match="expected a preference manifest"):
        PreferenceManifestDataset(PreferenceManifestConfig(str(tmp_path / "none.jsonl")))


def preference_batch(count=4, seed=0):
    dataset = ShapesPreferencesDataset(ShapesPreferencesConfig(num_samples=32, size=32, seed=seed))
    return collate_samples([dataset.load(i) for i in range(count)], 32, 32)


def swapped(batch):
    return type(batch)(keys=batch.keys, captions=batch.captions, images=batch.rejected_images,
                       rejected_images=batch.images)


def test_at_the_start_the_model_is_its_reference_and_the_loss_is_log_2():
    model = build_model("tiny", seed=0)
    task = PreferenceTask(model, beta=500, context_noise=0.3)
    result = task.loss(model, preference_batch(), torch.Generator().manual_seed(0))
    assert result.metrics["margin"] == 0.0
    assert result.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    # Every trained parameter gets a gradient, the LM head's a zero one, as data-parallel training needs.
    result.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)



def test_with_the_steps_number_of_pairs_the_loss_and_metrics_are_shares_of_the_step():
    model = build_model("tiny", seed=0)
    task = PreferenceTask(model, beta=500, sft_weight=0.5)
    batch = preference_batch()
    assert task.prepare(batch, torch.Generator()) is batch and task.target_counts(batch) == {"pairs": len(batch)}
    # Every micro-batch holds the same number of pairs: both averagings train alike, and a resume across
    # them is not refused.
    assert not task.counts_targets and TextToImageTask(model).counts_targets
    mean = task.loss(model, batch, torch.Generator().manual_seed(0))
    share = task.loss(model, batch, torch.Generator().manual_seed(0), totals={"pairs": 4 * len(batch)})
    torch.testing.assert_close(share.loss * 4, mean.loss)
    assert {name: 4 * value for name, value in share.metrics.items()} == pytest.approx(mean.metrics, rel=1e-6)
    with pytest.raises(ValueError, match=r"totals\['pairs'\] must be at least this batch's 4 pairs, found 3"):
        task.loss(model, batch, torch.Generator().manual_seed(0), totals={"pairs": 3})


def test_the_two_images_of_a_pair_read_the_same_context_noise_and_word_substitutions():
    model = build_model("tiny", seed=0).train()
    task = PreferenceTask(model, beta=500, context_noise=0.5)
    batch, pairs = preference_batch(), 4
    read = []
    hook = model.image_in_projector.register_forward_hook(lambda module, inputs, out: read.append(inputs[0]))
    task.loss(model, batch, torch.Generator().manual_seed(0))
    hook.remove()
    sequences, _ = task.pair_sequences(batch)
    noise = (read[0] - sequences.image_tokens).detach()  # the policy's context noise, (2B, L, D)
    assert noise.abs().sum() > 0
    torch.testing.assert_close(noise[:pairs], noise[pairs:], rtol=0, atol=1e-6)  # up to the images' rounding

    from nextstep import load_model

    worded = load_model("emoji-shapes-64").train()  # word vectors, substituted at a rate of 0.4
    ids = torch.tensor([worded.text_tokenizer.encode("a red circle to the left of a blue square and a "
                                                     "green triangle")] * 2)
    mask, tokens = torch.zeros(ids.shape, dtype=torch.bool), torch.zeros(*ids.shape, worded.token_dim)
    shared = worded.embed(ids, mask, tokens, substitute=True, generator=torch.Generator().manual_seed(0),
                          draw_rows=torch.tensor([0, 0]))
    apart = worded.embed(ids, mask, tokens, substitute=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(shared[0], shared[1]) and not torch.equal(apart[0], apart[1])

def test_training_prefers_the_chosen_images_and_swapping_them_flips_the_margin():
    model = build_model("tiny", seed=0)
    task = PreferenceTask(model, beta=200)
    batch = preference_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(15):
        result = task.loss(model, batch, torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        result.loss.backward()
        optimizer.step()
        losses.append(result.loss.item())
    after = task.loss(model, batch, torch.Generator().manual_seed(99))
    assert after.loss.item() < 0.5 * math.log(2) and after.metrics["accuracy"] == 1.0
    flipped = task.loss(model, swapped(batch), torch.Generator().manual_seed(99))
    assert flipped.metrics["margin"] == pytest.approx(-after.metrics["margin"], rel=1e-4, abs=1e-7)
    assert all(p.requires_grad is False for p in task.reference.parameters())


def test_the_flow_error_of_each_row_is_read_at_the_given_draws(tiny_model):
    model = tiny_model.eval()
    builder = model.sequences
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 4, model.token_dim, generator=generator)
    batch = builder.collate([builder.example("a red circle", tokens[0], 2, 2),
                             builder.example("b", tokens[1], 2, 2)])
    times = torch.rand(8, generator=generator)
    noise = torch.randn(8, model.token_dim, generator=generator)
    with torch.no_grad():
        output = model(batch, flow_draws=(times, noise))
        hidden = model.backbone(model.embed(batch.input_ids, batch.image_mask, batch.image_tokens),
                                torch.arange(batch.input_ids.shape[1]).expand(2, -1), batch.attention_mask)
        mask = batch.image_target_mask[:, 1:]
        conditions = model.image_out_projector(hidden[:, :-1][mask])
        expected = model.image_head.flow_error(batch.image_tokens[:, 1:][mask], conditions, times, noise)
    torch.testing.assert_close(output.image_per_row, expected.view(2, 4).mean(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(output.image, expected.mean(), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match=r"flow_draws must be times \(8,\) and noise \(8, 64\)"):
        model(batch, flow_draws=(times[:3], noise))


def test_bad_settings_and_batches_are_refused(tiny_model):
    with pytest.raises(ValueError, match="beta must be > 0"):
        PreferenceTask(tiny_model, beta=0)
    with pytest.raises(ValueError, match="sft_weight must be a number >= 0"):
        PreferenceTask(tiny_model, sft_weight=-1)
    plain = collate_samples([ImageTextSample(key="a", caption="a circle", image=preference_batch_image())], 32, 32)
    with pytest.raises(ValueError, match="needs batches with rejected images"):
        PreferenceTask(tiny_model).loss(tiny_model, plain, torch.Generator())
    with pytest.raises(ValueError, match="holds preference pairs .* train them with PreferenceTask"):
        TextToImageTask(tiny_model).sequences(preference_batch(2), torch.Generator())
    with pytest.raises(ValueError, match=r"preference.*keys among \['beta', 'sft_weight'\]"):
        RecipeConfig(preference={"temperature": 1.0})
    with pytest.raises(ValueError, match="train.pack_length"):
        RecipeConfig.from_dict({"preference": {"beta": 100}, "train": {"pack_length": 64}})
    with pytest.raises(ValueError, match=r"train.text_dropout must be None or 0 for preference training .*found 0.1"):
        RecipeConfig.from_dict({"preference": {"beta": 100}, "train": {"text_dropout": 0.1}})
    RecipeConfig.from_dict({"preference": {"beta": 100}, "train": {"text_dropout": 0.0}})
    for settings, field in (({"beta": 0}, "preference.beta"), ({"sft_weight": -1.0}, "preference.sft_weight"),
                            ({"beta": "100"}, "preference.beta")):
        with pytest.raises(ValueError, match=field):  # refused with the recipe, before any data is read
            RecipeConfig(preference=settings)


def preference_batch_image():
    from PIL import Image

    return Image.new("RGB", (32, 32), "white")


def test_a_preference_recipe_trains_and_writes_a_model(tmp_path):
    from nextstep.training.recipe import run_recipe

    recipe = RecipeConfig.from_dict({
        "model": "tiny", "preference": {"beta": 100, "sft_weight": 0.5},
        "data": {"datasets": [{"type": "shapes_preferences", "num_samples": 16, "size": 32}], "resolution": 32},
        "train": {"max_steps": 2, "micro_batch_size": 4, "warmup_steps": 1, "learning_rate": 1e-4,
                  "log_every": 1, "checkpoint_every": 100},
    })
    trainer = run_recipe(recipe, tmp_path, show_progress=False)
    assert isinstance(trainer.task, PreferenceTask)
    log = (tmp_path / "train_log.csv").read_text().splitlines()
    assert "accuracy" in log[0] and "sft_loss" in log[0] and len(log) == 3
    assert (tmp_path / "model" / "model.safetensors").exists()


def test_a_preference_run_does_not_resume_against_a_changed_start_model(tmp_path, tiny_model):
    from nextstep.training.recipe import REFERENCE_FILE, run_recipe

    tiny_model.save_pretrained(tmp_path / "start")
    recipe = RecipeConfig.from_dict({
        "model": str(tmp_path / "start"), "preference": {"beta": 100},
        "data": {"datasets": [{"type": "shapes_preferences", "num_samples": 8, "size": 32}], "resolution": 32},
        "train": {"max_steps": 1, "micro_batch_size": 4, "warmup_steps": 1, "learning_rate": 1e-4,
                  "log_every": 1, "checkpoint_every": 1},
    })
    run_recipe(recipe, tmp_path / "run", show_progress=False)
    assert json.loads((tmp_path / "run" / REFERENCE_FILE).read_text())["model"] == str(tmp_path / "start")
    longer = recipe.replace(train=recipe.train.replace(max_steps=2))
    tiny_model.save_pretrained(tmp_path / "start")  # the start model's files written again
    with pytest.raises(ValueError, match=r"began preference training against .*start as it was then .* the "
                                         r"resumed run's reference model would be another"):
        run_recipe(longer, tmp_path / "run", show_progress=False)
    run_recipe(longer, tmp_path / "run", resume=False, show_progress=False)  # starting over is the way


def test_training_lowers_the_chosen_error_more_than_the_rejected_one_and_sft_reads_the_chosen():
    """Measured on the errors themselves, not on the task's own margin (which a flipped sign flips too)."""
    model = build_model("tiny", seed=0)
    task = PreferenceTask(model, beta=200)
    batch = preference_batch()
    before = task.loss(model, batch, torch.Generator().manual_seed(99)).metrics
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(15):
        result = task.loss(model, batch, torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        result.loss.backward()
        optimizer.step()
    after = task.loss(model, batch, torch.Generator().manual_seed(99)).metrics
    assert before["chosen_error"] - after["chosen_error"] > before["rejected_error"] - after["rejected_error"]
    fresh = build_model("tiny", seed=0)
    result = PreferenceTask(fresh, beta=200, sft_weight=1.0).loss(fresh, batch, torch.Generator().manual_seed(0))
    assert result.metrics["sft_loss"] == pytest.approx(result.metrics["chosen_error"])


def test_the_reference_reads_the_same_context_noise_and_substitutions_as_the_model():
    """A model that is its own reference has margin 0 even with context noise, once its head reads its
    condition (a freshly built head's zero-initialised output does not)."""
    model = build_model("tiny", seed=0).train()
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    task = PreferenceTask(model, beta=500, context_noise=0.5)
    assert task.loss(model, preference_batch(), torch.Generator().manual_seed(0)).metrics["margin"] == 0.0


def test_a_pair_the_model_does_not_yet_prefer_counts_as_no_win():
    """Accuracy is the share of pairs whose preferred image the model favours more than its reference does;
    at the start the model is its reference, every margin is 0, and no pair is won."""
    model = build_model("tiny", seed=0)
    task = PreferenceTask(model, beta=500, context_noise=0.3)
    metrics = task.loss(model, preference_batch(), torch.Generator().manual_seed(0)).metrics
    assert metrics["margin"] == 0.0 and metrics["accuracy"] == 0.0


def test_the_chosen_image_shows_the_captioned_scene_and_the_rejected_one_its_near_miss():
    from nextstep.training.data.shapes.render import render_scene

    dataset = ShapesPreferencesDataset(ShapesPreferencesConfig(num_samples=6, size=32))
    for index in range(6):
        scene, miss = dataset.pair(index)
        sample = dataset.load(index)
        assert sample.caption == scene.caption and sample.metadata["chosen"]["caption"] == scene.caption
        assert sample.image.tobytes() == render_scene(scene, 32, 32).tobytes()
        assert sample.rejected_image.tobytes() == render_scene(miss, 32, 32).tobytes()
        assert sample.image.tobytes() != sample.rejected_image.tobytes()


def test_a_colour_near_miss_swaps_the_two_colours_and_keeps_shapes_and_places():
    swaps = 0
    for seed in range(40):
        rng = random.Random(seed)
        scene = sample_scene(rng, "color_attr")
        miss = near_miss_scene(rng, scene)
        if miss is None or [o.shape for o in miss.objects] != [o.shape for o in scene.objects]:
            continue
        swaps += 1
        first, second = scene.objects
        assert [o.colour for o in miss.objects] == [second.colour, first.colour]
        assert [o.center for o in miss.objects] == [first.center, second.center]
    assert swaps >= 5


def test_a_near_miss_that_still_matches_the_caption_is_refused():
    from nextstep.training.data.shapes.metadata import Scene, ShapeObject

    # Both objects red: swapping their colours changes nothing the caption states.
    same = Scene((ShapeObject("circle", "red", (0.25, 0.5), 0.25), ShapeObject("square", "red", (0.75, 0.5), 0.25)),
                 "a red circle and a red square", "color_attr")
    misses = [near_miss_scene(random.Random(seed), same) for seed in range(30)]
    assert None in misses  # the colour swaps
    for miss in misses:
        if miss is not None:
            assert same.caption not in true_captions(miss)
            assert {o.shape for o in miss.objects} != {"circle", "square"}


def _moved_away_from_its_reference(task, seed=1, scale=0.05):
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        for parameter in task.model.parameters():
            if parameter.requires_grad:  # the trained weights; the image tokenizer stays as it was
                parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return task.model


def test_the_metrics_of_a_model_apart_from_its_reference_are_shares_of_the_step_and_read_both_models():
    model = build_model("tiny", seed=0)
    task = PreferenceTask(model, beta=500)
    _moved_away_from_its_reference(task)
    batch = preference_batch()
    mean = task.loss(model, batch, torch.Generator().manual_seed(0))
    share = task.loss(model, batch, torch.Generator().manual_seed(0), totals={"pairs": 4 * len(batch)})
    assert mean.metrics["margin"] != 0.0 and 0.0 < mean.metrics["accuracy"] <= 1.0
    assert {name: 4 * value for name, value in share.metrics.items()} == pytest.approx(mean.metrics, rel=1e-6)
    # The reference's own errors, at the same draws, from a task whose model is the reference.
    reference = PreferenceTask(task.reference, beta=500)
    by_reference = reference.loss(task.reference, batch, torch.Generator().manual_seed(0)).metrics
    expected = ((by_reference["chosen_error"] - mean.metrics["chosen_error"])
                - (by_reference["rejected_error"] - mean.metrics["rejected_error"]))
    assert mean.metrics["margin"] == pytest.approx(expected, rel=1e-4, abs=1e-8)
    assert by_reference["rejected_error"] != pytest.approx(mean.metrics["rejected_error"], rel=1e-6)


def test_the_sft_term_is_weighted_by_sft_weight():
    batch = preference_batch()
    losses = {}
    for weight in (0.0, 0.25, 2.0):
        model = build_model("tiny", seed=0)
        result = PreferenceTask(model, beta=100, sft_weight=weight).loss(model, batch, torch.Generator().manual_seed(0))
        losses[weight] = (result.loss.item(), result.metrics)
    sft = losses[0.25][1]["sft_loss"]
    assert sft > 0 and "sft_loss" not in losses[0.0][1]
    assert losses[0.25][0] - losses[0.0][0] == pytest.approx(0.25 * sft, rel=1e-4)
    assert losses[2.0][0] - losses[0.0][0] == pytest.approx(2.0 * sft, rel=1e-4)


def test_a_task_from_a_train_config_takes_its_context_noise_and_preference_settings():
    from nextstep.training.config import TrainConfig

    model = build_model("tiny", seed=0)
    task = PreferenceTask.from_train_config(model, TrainConfig(context_noise=0.3), beta=100, sft_weight=0.5)
    assert (task.context_noise, task.beta, task.sft_weight) == (0.3, 100.0, 0.5)
    with pytest.raises(ValueError, match="pack_length must be None"):
        PreferenceTask.from_train_config(model, TrainConfig(pack_length=64))


def test_the_pair_times_are_drawn_as_the_heads_training_draws_them(monkeypatch):
    import dataclasses

    from nextstep.training import preference

    calls = []
    real = preference.sample_times

    def recorded(count, method, **options):
        calls.append((count, method, options["mean"], options["std"], options["shift"]))
        return real(count, method, **options)

    monkeypatch.setattr(preference, "sample_times", recorded)
    model = build_model("tiny", seed=0)
    head = model.image_head.config
    PreferenceTask(model, beta=100).loss(model, preference_batch(), torch.Generator().manual_seed(0))
    model.image_head.config = dataclasses.replace(head, time_sampling="uniform", time_shift=3.0)
    PreferenceTask(model, beta=100).loss(model, preference_batch(), torch.Generator().manual_seed(0))
    model.image_head.config = dataclasses.replace(head, time_mean=0.5, time_std=0.7)
    PreferenceTask(model, beta=100).loss(model, preference_batch(), torch.Generator().manual_seed(0))
    assert [call[1:] for call in calls] == [("logit_normal", 0.0, 1.0, 1.0), ("uniform", 0.0, 1.0, 3.0),
                                            ("logit_normal", 0.5, 0.7, 1.0)]
    assert all(call[0] == calls[0][0] > 0 and call[0] % 4 == 0 for call in calls)


@pytest.mark.parametrize("training", [True, False], ids=["train_mode_word_substitutions", "eval_mode"])
def test_the_shipped_model_with_word_vectors_is_its_own_reference_in_either_mode(training):
    from nextstep import load_model

    model = load_model("emoji-shapes-64").train(training)
    task = PreferenceTask(model, beta=500)
    dataset = ShapesPreferencesDataset(ShapesPreferencesConfig(num_samples=8, size=64))
    batch = collate_samples([dataset.load(i) for i in range(2)], 64, 64)
    assert task.loss(model, batch, torch.Generator().manual_seed(0)).metrics["margin"] == 0.0


def test_each_pairs_rows_read_its_own_caption_and_every_token_counts():
    model = build_model("tiny", seed=0)
    task = PreferenceTask(model, beta=100)
    batch = preference_batch()
    sequences, count = task.pair_sequences(batch)
    pairs = len(batch)
    assert len(set(batch.captions)) == pairs and count == 4
    for index, caption in enumerate(batch.captions):
        words = model.text_tokenizer.encode(caption)
        for row in (index, pairs + index):
            assert sequences.input_ids[row, :len(words)].tolist() == words, (caption, row)
    result = task.loss(model, batch, torch.Generator().manual_seed(0))
    assert result.num_tokens == int(sequences.attention_mask.sum())
    with pytest.raises(ValueError, match="beta must be a number >= 0"):
        PreferenceTask(model, beta=True)


def test_a_model_with_dropout_replays_its_draws_in_the_reference_and_starts_at_log_2(trained_like_model):
    model = trained_like_model  # a head whose output depends on its condition
    model.image_out_projector = torch.nn.Sequential(torch.nn.Dropout(0.5), model.image_out_projector)
    task = PreferenceTask(model, beta=500)
    model.train()
    result = task.loss(model, preference_batch(), torch.Generator().manual_seed(0))
    assert result.metrics["margin"] == 0.0
    assert result.loss.item() == pytest.approx(math.log(2), abs=1e-6)


def test_a_pair_of_one_image_twice_has_no_margin_for_a_model_apart_from_its_reference():
    model = build_model("tiny", seed=0)
    task = PreferenceTask(model, beta=500, context_noise=0.3)
    _moved_away_from_its_reference(task)
    batch = preference_batch()
    same = type(batch)(keys=batch.keys, captions=batch.captions, images=batch.images, rejected_images=batch.images)
    result = task.loss(model, same, torch.Generator().manual_seed(0))
    assert result.metrics["accuracy"] == 0.0
    assert result.metrics["margin"] == pytest.approx(0.0, abs=1e-7)
    assert result.loss.item() == pytest.approx(math.log(2), abs=1e-5)
    apart = task.loss(model, batch, torch.Generator().manual_seed(0))
    assert apart.loss.item() != pytest.approx(math.log(2), abs=1e-5)
