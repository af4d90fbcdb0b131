"""Rounds of preference training: each round draws with, judges and trains from the previous round's model."""

import json
from dataclasses import replace

import pytest

from nextstep.evaluation import self_judged_pairs
from nextstep.evaluation.sampling import SamplingSettings
from nextstep.training import preference_rounds
from nextstep.training.preference_rounds import round_recipe, run_preference_rounds
from nextstep.training.recipe import RecipeConfig


def _recipe(model: str) -> dict:
    return {"model": model, "preference": {"beta": 100},
            "data": {"datasets": [{"type": "preference_manifest", "path": "set-by-each-round"}], "resolution": 32},
            "train": {"seed": 7, "max_steps": 1, "micro_batch_size": 2, "warmup_steps": 1, "learning_rate": 1e-4,
                      "log_every": 1, "checkpoint_every": 100}}


def _alternate():
    """Right, wrong, right, wrong, ...: every prompt drawn twice gives one pair."""
    calls = []
    return lambda image, entry: calls.append(entry) or len(calls) % 2 == 1


def test_each_round_starts_from_the_last_and_a_rerun_keeps_what_is_done(tiny_model, tmp_path, monkeypatch):
    tiny_model.save_pretrained(tmp_path / "start")
    recipe = RecipeConfig.from_dict(_recipe(str(tmp_path / "start")))
    settings = SamplingSettings(height=32, width=32, num_steps=1, batch_size=8)
    options = dict(rounds=2, samples_per_prompt=2, settings=settings, prompts=["a red circle", "two squares"],
                   show_progress=False)
    records = run_preference_rounds(recipe, tmp_path / "rounds", judge=_alternate(), **options)
    first, second = (tmp_path / "rounds" / "round1", tmp_path / "rounds" / "round2")
    assert [(r.round, r.start, r.model, r.pairs) for r in records] == [
        (1, str(tmp_path / "start"), str(first / "model"), 2), (2, str(first / "model"), str(second / "model"), 2)]
    trained = json.loads((second / "recipe.json").read_text())
    assert trained["model"] == str(first / "model") and trained["train"]["seed"] == 8
    assert trained["data"]["datasets"] == [{"type": "preference_manifest",
                                            "path": str(second / "pairs" / "pairs.jsonl")}]
    assert (second / "model" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "rounds" / "rounds.json").read_text())[1]["pairs"] == 2

    # Everything is there: a rerun neither draws nor trains, and reports the same rounds.
    monkeypatch.setattr(self_judged_pairs, "generate_images", lambda *a, **k: pytest.fail("drew again"))
    monkeypatch.setattr("nextstep.training.recipe.run_recipe", lambda *a, **k: pytest.fail("trained again"))
    again = run_preference_rounds(recipe, tmp_path / "rounds", judge=_alternate(), **options)
    assert [(r.start, r.model, r.pairs, r.correct) for r in again] == [
        (r.start, r.model, r.pairs, r.correct) for r in records]
    # Kept pairs drawn with other options are not trained on under these: refused, naming what differs.
    for changed, named in ((dict(samples_per_prompt=3), "samples_per_prompt 2 there, 3 here"),
                           (dict(settings=replace(settings, cfg=5.0)), "settings"),
                           (dict(prompts=["a red circle"]), "prompts 'sha256 ")):
        with pytest.raises(ValueError, match=rf"round1 drew its pairs with other drawing options \(.*{named}"):
            run_preference_rounds(recipe, tmp_path / "rounds", judge=_alternate(), **dict(options, **changed))
    run_preference_rounds(recipe, tmp_path / "rounds", judge=_alternate(),  # another batch size draws the same
                          **dict(options, settings=replace(settings, batch_size=3)))
    # A call of fewer rounds keeps the later ones listed; one from another start refuses the kept rounds.
    run_preference_rounds(recipe, tmp_path / "rounds", judge=_alternate(), **dict(options, rounds=1))
    assert [r["round"] for r in json.loads((tmp_path / "rounds" / "rounds.json").read_text())] == [1, 2]
    tiny_model.save_pretrained(tmp_path / "other")
    other = RecipeConfig.from_dict(_recipe(str(tmp_path / "other")))
    with pytest.raises(ValueError, match="round1 was trained with another recipe \\(model: .*start.* there, "
                                         ".*other.* here\\)"):
        run_preference_rounds(other, tmp_path / "rounds", judge=_alternate(), **options)


def test_a_round_interrupted_before_training_continues_from_its_own_start(tiny_model, tmp_path, monkeypatch):
    tiny_model.save_pretrained(tmp_path / "start")
    tiny_model.save_pretrained(tmp_path / "other")
    settings = SamplingSettings(height=32, width=32, num_steps=1, batch_size=8)
    options = dict(rounds=1, samples_per_prompt=2, settings=settings, prompts=["a red circle", "two squares"],
                   show_progress=False)
    recipe = RecipeConfig.from_dict(_recipe(str(tmp_path / "start")))

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("nextstep.training.recipe.run_recipe", stopped)  # pairs drawn, training not begun
    with pytest.raises(KeyboardInterrupt):
        run_preference_rounds(recipe, tmp_path / "rounds", judge=_alternate(), **options)
    monkeypatch.undo()
    other = RecipeConfig.from_dict(_recipe(str(tmp_path / "other")))
    with pytest.raises(ValueError, match="round1 drew its pairs with .*start.*, not .*other"):
        run_preference_rounds(other, tmp_path / "rounds", judge=_alternate(), **options)
    # A training stopped before its first checkpoint (a log, no checkpoint) starts over.
    (tmp_path / "rounds" / "round1" / "train_log.csv").write_text("step,loss\n1,0.5\n")
    (record,) = run_preference_rounds(recipe, tmp_path / "rounds", judge=_alternate(), **options)
    assert record.pairs == 2 and (tmp_path / "rounds" / "round1" / "model" / "config.json").is_file()
    assert (tmp_path / "rounds" / "round1" / "earlier-runs" / "1" / "train_log.csv").is_file()


def test_recipes_the_rounds_cannot_run_are_refused_before_anything_runs(tmp_path):
    good = _recipe("tiny")
    with pytest.raises(ValueError, match="need a preference recipe"):
        round_recipe(RecipeConfig.from_dict({**good, "preference": {}}), "tiny", "p.jsonl", 1)
    shapes = {**good, "data": {"datasets": [{"type": "shapes_preferences", "num_samples": 8}], "resolution": 32}}
    with pytest.raises(ValueError, match=r"one preference_manifest dataset.*found \['shapes_preferences'\]"):
        run_preference_rounds(RecipeConfig.from_dict(shapes), tmp_path, rounds=1)
    with pytest.raises(ValueError, match="rounds must be an integer >= 1, found 0"):
        run_preference_rounds(RecipeConfig.from_dict(good), tmp_path, rounds=0)
    assert not any(tmp_path.iterdir())
    kept = round_recipe(RecipeConfig.from_dict(good), "m", "p.jsonl", 3)
    assert (kept.model, kept.train.seed, kept.data.datasets) == ("m", 9, ({"type": "preference_manifest",
                                                                          "path": "p.jsonl"},))


def test_a_round_without_pairs_stops_before_training(tiny_model, tmp_path, monkeypatch):
    tiny_model.save_pretrained(tmp_path / "start")
    monkeypatch.setattr("nextstep.training.recipe.run_recipe", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(ValueError, match="round 1 drew no pair: 1.000 of 4 images were judged right"):
        run_preference_rounds(RecipeConfig.from_dict(_recipe(str(tmp_path / "start"))), tmp_path / "rounds",
                              rounds=1, samples_per_prompt=2, prompts=["a", "b"], judge=lambda image, entry: True,
                              settings=SamplingSettings(height=32, width=32, num_steps=1), show_progress=False)
    assert not (tmp_path / "rounds" / "round1" / "pairs").exists()  # the next call draws again
    assert not (tmp_path / "rounds" / "round1" / "start.json").exists()  # from any start


def test_the_command_runs_rounds_with_the_judging_and_sampling_options(tiny_model, tmp_path, monkeypatch, capsys):
    from nextstep.cli import main

    tiny_model.save_pretrained(tmp_path / "start")
    (tmp_path / "recipe.json").write_text(json.dumps(_recipe(str(tmp_path / "start"))))
    (tmp_path / "prompts.txt").write_text("a red circle\ntwo squares\n")
    monkeypatch.setitem(self_judged_pairs.JUDGES, "alternate", _alternate())
    # The settings come from the start model's config: its weights load once, in the round.
    monkeypatch.setattr("nextstep.builders.load_model", lambda *a, **k: pytest.fail("loaded by the command line"))
    code = main(["preference-rounds", str(tmp_path / "recipe.json"), "--rounds", "1", "-o", str(tmp_path / "out"),
                 "--prompts", str(tmp_path / "prompts.txt"), "--judge", "alternate", "--samples-per-prompt", "2",
                 "--size", "32", "--steps", "1", "--set", "train.learning_rate=2e-4", "--quiet"])
    assert code == 0
    assert "round 1: 2 pairs" in capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "round1" / "pairs" / "summary.json").read_text())
    assert (summary["settings"]["height"], summary["settings"]["num_steps"]) == (32, 1)
    assert summary["settings"]["cfg"] == tiny_model.config.generation.cfg
    from nextstep.training.recipe import build_recipe_model, recipe_generation_defaults, recipe_sampler

    for model in ("tiny", str(tmp_path / "start")):
        recipe = RecipeConfig.from_dict(_recipe(model))
        built = build_recipe_model(recipe).config
        assert (recipe_generation_defaults(recipe), recipe_sampler(recipe)) == (built.generation, built.sampler), model
    assert json.loads((tmp_path / "out" / "round1" / "recipe.json").read_text())["train"]["learning_rate"] == 2e-4
    (tmp_path / "shapes.json").write_text(json.dumps({**_recipe("tiny"), "preference": {}}))
    assert main(["preference-rounds", str(tmp_path / "shapes.json"), "--rounds", "1", "-o", str(tmp_path / "x")]) == 2
    assert "need a preference recipe" in capsys.readouterr().err
    assert preference_rounds.SUMMARY_FILE == "rounds.json"


def test_round_one_draws_with_the_model_its_training_builds_and_trains_that_model(tmp_path, monkeypatch):
    """model_seed (like model_arguments, image_tokenizer and training_settings) applies to the drawing too."""
    import torch

    from nextstep.training.recipe import build_recipe_model

    recipe = RecipeConfig.from_dict({**_recipe("tiny"), "model_seed": 7,
                                     "training_settings": {"image_loss_weight": 2.0}})
    expected = build_recipe_model(round_recipe(recipe, "tiny", "p.jsonl", 1))
    drawn_with = []

    def draw(model, output, **options):
        drawn_with.append((model, model.training))
        (output / "summary.json").parent.mkdir(parents=True)
        (output / "summary.json").write_text(json.dumps({"pairs": 1, "correct": 0.5, "images": 2}))

    trained = []
    monkeypatch.setattr(self_judged_pairs, "write_self_judged_pairs", draw)
    monkeypatch.setattr("nextstep.training.recipe.run_recipe", lambda *a, model=None, **k: trained.append(model))
    run_preference_rounds(recipe, tmp_path / "rounds", rounds=1, show_progress=False)
    ((model, training),) = drawn_with
    assert not training and model.config.image_loss_weight == 2.0 and trained == [model]  # built once
    for name, tensor in expected.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor, msg=name)


@pytest.mark.parametrize("fields, message", [
    ({"model": "emoji-shapes-64"}, r"unknown model preset 'emoji-shapes-64'.*is a shipped model: give its folder "
                                   r".*emoji-shapes-64 as the recipe's model"),
    ({"model_arguments": {"depth": 3}}, r"model_arguments \['depth'\] do not fit the preset 'tiny'"),
    ({"image_tokenizer": "missing/vae"}, r"expected a VAE checkpoint at 'missing/vae', found nothing"),
])
def test_a_start_model_training_cannot_build_is_refused_before_anything_is_drawn(tmp_path, monkeypatch, fields,
                                                                                  message):
    monkeypatch.setattr(self_judged_pairs, "write_self_judged_pairs", lambda *a, **k: pytest.fail("drew"))
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        run_preference_rounds(RecipeConfig.from_dict({**_recipe("tiny"), **fields}), tmp_path / "rounds", rounds=1)
    assert not (tmp_path / "rounds").exists()


def _round_stopped_after_its_first_checkpoint(model, tmp_path, monkeypatch) -> tuple[dict, dict]:
    """Run one round of two training steps that is stopped right after its first checkpoint.

    Returns:
        the recipe (a dict, to change) and the options of `run_preference_rounds`.
    """
    from nextstep.training.checkpointing import CheckpointManager

    model.save_pretrained(tmp_path / "start")
    recipe = _recipe(str(tmp_path / "start"))
    recipe["train"].update(max_steps=2, checkpoint_every=1)
    settings = SamplingSettings(height=32, width=32, num_steps=1, batch_size=8)
    options = dict(rounds=1, samples_per_prompt=2, settings=settings, prompts=["a red circle", "two squares"],
                   show_progress=False)
    saved = CheckpointManager.save

    def save_then_stop(self, step, *args, **kwargs):
        saved(self, step, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(CheckpointManager, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_preference_rounds(RecipeConfig.from_dict(recipe), tmp_path / "rounds", judge=_alternate(), **options)
    monkeypatch.undo()
    return recipe, options


def test_a_round_interrupted_after_a_checkpoint_resumes_its_training_from_it(tiny_model, tmp_path, monkeypatch):
    from nextstep.training.checkpointing import CheckpointManager
    from nextstep.training.logging import read_log

    recipe, options = _round_stopped_after_its_first_checkpoint(tiny_model, tmp_path, monkeypatch)
    recipe = RecipeConfig.from_dict(recipe)
    folder = tmp_path / "rounds" / "round1"
    assert CheckpointManager(folder / "checkpoints").steps() == [1]
    assert not (folder / "model" / "config.json").is_file()

    (record,) = run_preference_rounds(recipe, tmp_path / "rounds", judge=_alternate(), **options)
    assert record.pairs == 2 and (folder / "model" / "config.json").is_file()
    assert not (folder / "earlier-runs").exists()  # nothing was set aside: the training went on, not over
    assert CheckpointManager(folder / "checkpoints").steps() == [1, 2]
    assert [row["step"] for row in read_log(folder / "train_log.csv")] == [1, 2]


def _drawn_summary(summaries):
    def draw(model, output, **options):
        summaries.append(options)
        output.mkdir(parents=True)
        (output / "summary.json").write_text(json.dumps({"pairs": 3, "correct": 0.25, "images": 8}))
    return draw


def test_a_round_passes_its_drawing_options_on_and_records_the_judged_share(tmp_path, monkeypatch):
    drawn, trained = [], []
    monkeypatch.setattr(self_judged_pairs, "write_self_judged_pairs", _drawn_summary(drawn))
    monkeypatch.setattr("nextstep.training.recipe.run_recipe", lambda *a, **k: trained.append(a[1]))
    settings = SamplingSettings(height=32, width=32, num_steps=1)
    (record,) = run_preference_rounds(RecipeConfig.from_dict(_recipe("tiny")), tmp_path / "rounds", rounds=1,
                                      samples_per_prompt=4, combinations="unseen", settings=settings,
                                      show_progress=False)
    ((options,),) = [drawn]
    assert (options["samples_per_prompt"], options["combinations"], options["settings"]) == (4, "unseen", settings)
    assert (record.pairs, record.correct) == (3, 0.25) and trained == [tmp_path / "rounds" / "round1"]
    (listed,) = json.loads((tmp_path / "rounds" / "rounds.json").read_text())
    assert (listed["pairs"], listed["correct"]) == (3, 0.25)


def test_kept_pairs_without_a_start_record_are_reused_from_any_start(tmp_path, monkeypatch):
    pairs = tmp_path / "rounds" / "round1" / "pairs"
    pairs.mkdir(parents=True)
    (pairs / "summary.json").write_text(json.dumps({"pairs": 2, "correct": 0.5, "images": 4}))
    trained = []
    monkeypatch.setattr(self_judged_pairs, "write_self_judged_pairs", lambda *a, **k: pytest.fail("drew"))
    monkeypatch.setattr("nextstep.training.recipe.run_recipe", lambda *a, model=None, **k: trained.append(model))
    (record,) = run_preference_rounds(RecipeConfig.from_dict(_recipe("tiny")), tmp_path / "rounds", rounds=1,
                                      show_progress=False)
    assert (record.pairs, record.correct) == (2, 0.5) and trained == [None]  # nothing built: nothing drawn


def test_a_round_holding_a_checkpoint_refuses_another_recipe_with_the_rounds_advice(tiny_model, tmp_path,
                                                                                    monkeypatch):
    recipe, options = _round_stopped_after_its_first_checkpoint(tiny_model, tmp_path, monkeypatch)
    recipe["preference"] = {"beta": 200}
    with pytest.raises(ValueError, match="round1 was trained with another recipe .*beta.*give the rounds "
                                         "another output folder"):
        run_preference_rounds(RecipeConfig.from_dict(recipe), tmp_path / "rounds", judge=_alternate(), **options)


def test_the_command_refuses_sampler_options_the_start_model_s_sampler_lacks_before_drawing(tmp_path, monkeypatch,
                                                                                              capsys):
    from nextstep.cli import main

    (tmp_path / "recipe.json").write_text(json.dumps(_recipe("tiny")))
    monkeypatch.setattr(preference_rounds, "run_preference_rounds", lambda *a, **k: pytest.fail("the rounds ran"))
    assert main(["preference-rounds", str(tmp_path / "recipe.json"), "--rounds", "1", "-o", str(tmp_path / "out"),
                 "--sampler-option", "nope=1", "--quiet"]) == 2
    assert "sampler options for euler: EulerSamplerConfig got unknown key(s) ['nope']" in \
        capsys.readouterr().err
