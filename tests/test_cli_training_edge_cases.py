"""Edge cases of the training and evaluation commands and of the training settings they read."""

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
from cli_helpers import fake_suites, finished_trainer
from hypothesis import example, given
from hypothesis import strategies as st

from nextstep.cli import _read_record, build_parser, main

RECIPE = {
    "model": "tiny",
    "data": {"datasets": [{"type": "shapes", "num_samples": 8, "size": 32}], "resolution": 32},
    "train": {"max_steps": 3, "micro_batch_size": 2, "warmup_steps": 1},
}


def _recording_run(calls, latest=None):
    def run(recipe, output, **kwargs):
        calls.append((recipe, output, kwargs))
        return finished_trainer(latest=latest)

    return run


@pytest.mark.parametrize("text", ["", "not json", "[1, 2]", '"a string"', '{"cut short": '])
def test_a_record_that_is_not_a_json_object_reads_as_none(tmp_path, text):
    """A damaged or foreign record file reads as no record instead of failing the command."""
    (tmp_path / "record.json").write_text(text)
    assert _read_record(tmp_path / "record.json") is None
    assert _read_record(tmp_path / "missing.json") is None
    (tmp_path / "good.json").write_text('{"a.png": {"seed": 1}}')
    assert _read_record(tmp_path / "good.json") == {"a.png": {"seed": 1}}


def test_generate_reruns_over_a_damaged_record_of_its_own_folder(tmp_path):
    """A generation record that is not JSON is taken as no record: the images go in and a new record is written."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "generation.json").write_text("{not json")
    arguments = [
        "generate",
        "a red circle",
        "--model",
        "tiny",
        "--steps",
        "1",
        "--height",
        "32",
        "--width",
        "32",
        "--output",
        str(out),
        "--quiet",
    ]
    assert main(arguments) == 0
    assert set(json.loads((out / "generation.json").read_text())) == {"000-a-red-circle-0.png"}


def test_max_steps_wins_over_a_set_of_the_same_field(tmp_path, monkeypatch):
    """--max-steps is the last word on train.max_steps, whatever --set says."""
    calls = []
    monkeypatch.setattr("nextstep.training.recipe.run_recipe", _recording_run(calls))
    (tmp_path / "recipe.json").write_text(json.dumps(RECIPE))
    train = ["train", str(tmp_path / "recipe.json"), "-o", str(tmp_path / "run"), "--quiet"]
    sets = ["--set", "train.max_steps=2", "--set", "train.learning_rate=0.002"]
    assert main([*train, "--max-steps", "7", *sets]) == 0
    recipe = calls[-1][0]
    assert (recipe.train.max_steps, recipe.train.learning_rate) == (7, 0.002)
    assert main([*train, *sets[:2]]) == 0
    assert calls[-1][0].train.max_steps == 2


def test_train_logs_info_unless_quiet(tmp_path, monkeypatch):
    """A quiet run shows warnings only; an ordinary one its info messages too."""
    levels = []
    monkeypatch.setattr(logging, "basicConfig", lambda **kwargs: levels.append(kwargs["level"]))
    monkeypatch.setattr("nextstep.training.recipe.run_recipe", _recording_run([]))
    (tmp_path / "recipe.json").write_text(json.dumps(RECIPE))
    for extra in (["--quiet"], []):
        assert main(["train", str(tmp_path / "recipe.json"), "-o", str(tmp_path / "run"), *extra]) == 0
    assert levels == [logging.WARNING, logging.INFO]


def test_train_names_no_checkpoint_or_model_that_the_run_did_not_leave(tmp_path, capsys, monkeypatch):
    """A run that left no checkpoint and no model folder prints its log only."""
    monkeypatch.setattr("nextstep.training.recipe.run_recipe", _recording_run([]))
    (tmp_path / "recipe.json").write_text(json.dumps(RECIPE))
    assert main(["train", str(tmp_path / "recipe.json"), "-o", str(tmp_path / "run"), "--quiet"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"log: {tmp_path / 'run' / 'train_log.csv'}"]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model").write_text("a file, not a model folder")
    assert main(["train", str(tmp_path / "recipe.json"), "-o", str(tmp_path / "run"), "--quiet"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"log: {tmp_path / 'run' / 'train_log.csv'}"]


def test_train_tokenizer_defaults_to_a_folder_named_after_its_command_and_recipe(tmp_path, capsys, monkeypatch):
    """Without --output a tokenizer run goes to outputs/train-tokenizer/<recipe name>, apart from model runs."""
    calls = []
    monkeypatch.setattr("nextstep.training.tokenizer_recipe.load_tokenizer_recipe", lambda name, overrides: name)
    monkeypatch.setattr("nextstep.training.tokenizer_recipe.run_tokenizer_recipe", _recording_run(calls))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "vae_recipe.json").write_text("{}")
    assert main(["train-tokenizer", "vae_recipe.json"]) == 0
    assert calls[-1][1:] == (Path("outputs/train-tokenizer/vae_recipe"), {"resume": True, "show_progress": True})
    assert f"log: {Path('outputs/train-tokenizer/vae_recipe/train_log.csv')}" in capsys.readouterr().out


def test_eval_tokenizer_draws_a_preset_s_random_weights_from_its_seed(tmp_path, monkeypatch):
    """The same --seed gives the same random tokenizer whatever ran before; another seed another one."""
    import torch

    import nextstep.evaluation.tokenizer_report as tokenizer_report

    weights = []

    def evaluate(tokenizer, output, **kwargs):
        weights.append(torch.cat([p.detach().flatten() for p in tokenizer.parameters()]))
        return SimpleNamespace(to_markdown=lambda: "")

    monkeypatch.setattr(tokenizer_report, "run_tokenizer_evaluation", evaluate)
    for seed in ("3", "3", "4"):
        torch.randn(7)  # the global generator moves between runs
        assert main(["eval-tokenizer", "tiny", "--output", str(tmp_path), "--seed", seed]) == 0
    assert torch.equal(weights[0], weights[1])
    assert not torch.equal(weights[0], weights[2])


def test_eval_runs_a_suite_named_twice_once(tmp_path, monkeypatch):
    """--suite tokenizer tokenizer is one tokenizer evaluation."""
    runs = []
    fake_suites(monkeypatch, runs)
    assert (
        main(
            [
                "eval",
                "tiny",
                "--size",
                "32",
                "--output",
                str(tmp_path / "eval"),
                "--quiet",
                "--suite",
                "tokenizer",
                "tokenizer",
            ]
        )
        == 0
    )
    assert runs == ["tokenizer"]
    record = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert list(record["suites"]) == ["tokenizer"] and record["running"] == {}


def test_eval_goes_on_in_a_folder_recorded_before_model_fingerprints(tmp_path, tiny_model, monkeypatch):
    """A record without a fingerprint compares on the model's name and settings: a later suite joins its summary."""
    runs = []
    fake_suites(monkeypatch, runs)
    tiny_model.save_pretrained(tmp_path / "model")
    out = tmp_path / "eval"
    common = ["eval", str(tmp_path / "model"), "--size", "32", "--output", str(out), "--quiet", "--suite"]
    assert main(common + ["tokenizer"]) == 0
    record = json.loads((out / "evaluation.json").read_text())
    del record["model_fingerprint"]
    (out / "evaluation.json").write_text(json.dumps(record))
    assert main(common + ["shapes"]) == 0
    assert {"tokenizer", "shapes"} <= set(json.loads((out / "summary.json").read_text()))


def test_eval_reruns_a_suite_that_was_interrupted_with_the_same_options(tmp_path, monkeypatch, capsys):
    """A suite that stopped part-way is run again into its folder without --overwrite; other options are refused."""
    out = tmp_path / "eval"
    common = ["eval", "tiny", "--size", "32", "--output", str(out), "--quiet", "--suite", "tokenizer"]
    fake_suites(monkeypatch, [], failing=("tokenizer",))
    assert main(common + ["--crops", "4"]) == 2
    assert "tokenizer stopped" in capsys.readouterr().err
    runs = []
    fake_suites(monkeypatch, runs)
    assert main(common + ["--crops", "5"]) == 2
    assert "with other settings" in capsys.readouterr().err
    assert main(common + ["--crops", "4"]) == 0
    assert runs == ["tokenizer"]


def test_eval_refuses_a_folder_whose_summary_is_another_model_s(tmp_path, monkeypatch, capsys):
    """The summary of another model's evaluation is not replaced, even when no suite folder is in the way."""
    runs = []
    fake_suites(monkeypatch, runs)
    out = tmp_path / "eval"
    assert main(["eval", "tiny", "--size", "32", "--output", str(out), "--quiet", "--suite", "tokenizer"]) == 0
    assert (
        main(["eval", "tiny", "--size", "32", "--output", str(out), "--quiet", "--suite", "shapes", "--seed", "1"]) == 2
    )
    assert "already holds summary.json from another evaluation" in capsys.readouterr().err
    assert runs == ["tokenizer"]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["eval-tokenizer", "tiny"], {"output": "outputs/eval-tokenizer", "count": 256, "size": 64, "seed": 1234}),
        (
            ["eval"],
            {
                "model": ["emoji-shapes-64"],
                "suite": ["all"],
                "output": "outputs/eval",
                "images_per_tag": 100,
                "limit": None,
                "scenes_per_group": 50,
                "crops": 256,
                "device": "cpu",
                "overwrite": False,
                "skip_finished": False,
                "size": None,
                "temperature": 1.0,
                "seed": 0,
                "batch_size": 32,
                "token_sampler": "loop",
                "steps": None,
            },
        ),
        (["add-word-vectors", "m", "out"], {"dim": 64, "substitution_probability": 0.2}),
        (["replace-decoder", "m", "t", "out"], {"decoder_dtype": "float32"}),
        (
            ["preference-pairs", "m", "out"],
            {
                "samples_per_prompt": 16,
                "combinations": "seen",
                "prompts": None,
                "judge": "shapes",
                "temperature": 1.0,
                "batch_size": 32,
            },
        ),
        (
            ["preference-rounds", "r", "--rounds", "2"],
            {
                "output": None,
                "set": None,
                "samples_per_prompt": 16,
                "combinations": "seen",
                "judge": "shapes",
                "device": "cpu",
            },
        ),
        (["train", "r"], {"output": None, "max_steps": None, "set": None, "no_resume": False, "quiet": False}),
        (["train-tokenizer", "r"], {"output": None, "max_steps": None, "no_resume": False}),
    ],
)
def test_the_training_and_evaluation_commands_default_as_documented(argv, expected):
    """Each option left out takes the default its help names."""
    args = vars(build_parser().parse_args(argv))
    assert {key: args[key] for key in expected} == expected


@pytest.mark.parametrize("value", ["0", "-3", "2.5", "1e3", "two", ""])
def test_counts_that_are_not_whole_numbers_from_1_are_refused(value, capsys):
    """--max-steps, --rounds and the like take whole numbers >= 1 and name what they found otherwise."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "r", "--max-steps", value])
    assert f"argument --max-steps: expected an integer >= 1, found {value}" in capsys.readouterr().err.replace("'", "")


@given(st.integers(-(10**6), 10**6))
def test_a_count_is_read_as_the_integer_written_from_1_up(number):
    """Every integer spelt in decimal is taken as itself when >= 1 and refused otherwise."""
    import argparse

    from nextstep.cli import _positive_int

    if number >= 1:
        assert _positive_int(str(number)) == number
    else:
        with pytest.raises(argparse.ArgumentTypeError, match=f"found {number}$"):
            _positive_int(str(number))


def test_replace_decoder_stores_a_float16_decoder_as_asked(tmp_path, tiny_model):
    """--decoder-dtype float16 stores the decoder in 16 bits and leaves the rest of the model as it was."""
    import torch
    from safetensors.torch import load_file

    from nextstep.tokenizers.vae_checkpoints import save_flux_vae

    tiny_model.save_pretrained(tmp_path / "model")
    save_flux_vae(tiny_model.image_tokenizer, tmp_path / "vae")
    assert (
        main(
            [
                "replace-decoder",
                str(tmp_path / "model"),
                str(tmp_path / "vae"),
                str(tmp_path / "out"),
                "--decoder-dtype",
                "float16",
            ]
        )
        == 0
    )
    written = load_file(tmp_path / "out" / "model.safetensors")
    assert {written[key].dtype for key in written if ".decoder." in key} == {torch.float16}
    assert {written[key].dtype for key in written if key.startswith("backbone.")} == {torch.float32}


@given(st.integers(1, 10**6), st.integers(0, 10**6))
@example(266, 1)
@example(266, 0)
def test_id_counts_name_every_id_read_through_word_vectors(vocab, further):
    """The ids a model reads through word vectors are named whenever there is one or more."""
    from nextstep.cli import _id_counts

    shown = _id_counts(SimpleNamespace(vocab_size=vocab, input_vocab_size=vocab + further))
    assert shown.startswith(f"{vocab:,} ids")
    assert shown.endswith(f" + {further:,} read through word vectors") == (further > 0)
    assert shown.endswith(" ids") == (further == 0)


@pytest.mark.parametrize(
    "changes",
    [
        {"warmup_steps": 0},
        {"sample_every": 0},
        {"num_workers": 0},
        {"min_learning_rate": 1e-4},
        {"betas": (0.0, 0.0)},
        {"text_dropout": 0.0},
        {"text_dropout": 1.0},
        {"grad_clip": 0.0},
        {"ema_decay": 0.0},
        {"weight_decay": 0.0},
        {"context_noise": 0.0},
        {"max_bad_fraction": 0.0},
        {"pack_length": 1},
        {"keep_last": 1},
        {"max_steps": 1},
    ],
)
def test_settings_at_the_edge_of_their_range_are_accepted(changes):
    """The documented ranges include their closed ends: no warm-up, no clipping, a floor equal to the peak."""
    from nextstep.training import TrainConfig

    config = TrainConfig(**changes)
    assert all(getattr(config, name) == value for name, value in changes.items())


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"keep_last": 0}, "keep_last"),
        ({"log_every": 0}, "log_every"),
        ({"checkpoint_every": 0}, "checkpoint_every"),
        ({"sample_steps": 0}, "sample_steps"),
        ({"max_steps": 2.0}, "max_steps"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"num_workers": -1}, "num_workers"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"min_learning_rate": -1e-6}, "min_learning_rate"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"betas": (0.9,)}, "betas"),
        ({"eps": 0.0}, "eps"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"grad_clip": -1.0}, "grad_clip"),
        ({"ema_decay": -0.1}, "ema_decay"),
        ({"text_dropout": 1.5}, "text_dropout"),
        ({"context_noise": -0.5}, "context_noise"),
        ({"pack_length": 0}, "pack_length"),
        ({"pack_length": 2.5}, "pack_length"),
        ({"max_bad_fraction": 1.0}, "max_bad_fraction"),
    ],
)
def test_settings_outside_their_range_are_refused_naming_the_field(changes, field):
    """Each training setting past its documented range is refused with the field's name."""
    from nextstep.training import TrainConfig

    with pytest.raises(ValueError, match=field):
        TrainConfig(**changes)


def test_the_training_defaults_are_the_release_hyperparameters():
    """Learning rate, warm-up, AdamW numbers, clipping and the run's bookkeeping default as documented."""
    from nextstep.training import TrainConfig

    config = TrainConfig()
    assert (config.learning_rate, config.min_learning_rate, config.warmup_steps) == (1e-4, 0.0, 5000)
    assert (tuple(config.betas), config.eps, config.weight_decay, config.grad_clip) == ((0.9, 0.95), 1e-8, 0.1, 1.0)
    assert (config.max_steps, config.micro_batch_size, config.gradient_accumulation) == (1000, 8, 1)
    assert (config.log_every, config.checkpoint_every, config.keep_last, config.sample_every) == (10, 1000, 3, 0)
    assert (config.ema_decay, config.text_dropout, config.context_noise, config.pack_length) == (0.0, None, 0.0, None)
    assert (config.precision, config.parallelism, config.loss_averaging) == ("auto", "ddp", "step")
    assert (config.max_bad_fraction, config.num_workers, config.tensorboard) == (0.01, 0, False)


def test_a_parameter_shared_between_modules_is_optimised_once():
    """Tied weights land in one group once, and a model of 1-d parameters only is trainable too."""
    from torch import nn

    from nextstep.training.optim import parameter_groups

    embedding = nn.Embedding(5, 3)
    head = nn.Linear(3, 5, bias=False)
    head.weight = embedding.weight
    decayed, undecayed = parameter_groups(nn.ModuleList([embedding, head, nn.LayerNorm(3)]), 0.1)
    assert [tuple(p.shape) for p in decayed["params"]] == [(5, 3)]
    assert len(undecayed["params"]) == 2 and undecayed["weight_decay"] == 0.0
    decayed, undecayed = parameter_groups(nn.LayerNorm(3), 0.1)
    assert decayed["params"] == [] and len(undecayed["params"]) == 2
    with pytest.raises(ValueError, match="no trainable parameters"):
        parameter_groups(nn.LayerNorm(3).requires_grad_(False), 0.1)


def test_the_schedule_sets_every_group_and_ends_at_the_configured_floor():
    """`apply` gives decayed and undecayed parameters the same rate; a config's floor is where the decay ends."""
    from torch import nn

    from nextstep.training import TrainConfig, WarmupCosineSchedule, build_optimizer

    config = TrainConfig(learning_rate=1e-3, min_learning_rate=2e-4, warmup_steps=2, max_steps=10)
    schedule = WarmupCosineSchedule.from_config(config)
    optimizer = build_optimizer(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)), config)
    for step, expected in ((0, 5e-4), (1, 1e-3), (10, 2e-4)):
        assert schedule.apply(optimizer, step) == pytest.approx(expected)
        assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([expected, expected])
    assert schedule.rate(9) > 2e-4


def test_an_average_of_decay_one_is_refused_and_a_loaded_state_is_copied():
    """A decay of 1 would never move; a loaded state is the average's own, not the caller's tensors."""
    import torch
    from torch import nn

    from nextstep.training import ExponentialMovingAverage

    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="decay must be in"):
        ExponentialMovingAverage(model, 1.0)
    state = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in model.named_parameters()}
    average = ExponentialMovingAverage.holding(model, state)
    average.decay = 0.5
    average.update(model)
    assert all(torch.equal(tensor, torch.zeros_like(tensor)) for tensor in state.values())
    torch.testing.assert_close(average.shadow["weight"], model.weight.detach() / 2)


def test_a_log_reopened_for_a_resume_keeps_the_rows_up_to_the_checkpoint_and_its_own_header(tmp_path):
    """Rows up to and including the resumed step stay, with the file's own columns; later, cut and garbled rows go."""
    from nextstep.training.logging import CSVLog, read_log

    path = tmp_path / "train_log.csv"
    path.write_text("step,loss,extra\n1,0.5,7\n2,0.25,\n2,0.3,1,surplus\n3,0.125,9\n4,0.1,1\n5,0.0")
    log = CSVLog(path, columns=("step", "loss"), resume_step=3)
    assert log.columns == ["step", "loss", "extra"]
    assert read_log(path) == [
        {"step": 1, "loss": 0.5, "extra": 7},
        {"step": 2, "loss": 0.25},
        {"step": 3, "loss": 0.125, "extra": 9},
    ]
    log.write({"step": 4, "loss": 0.123456789, "grad_norm": 2})
    assert path.read_text().splitlines()[0] == "step,loss,extra,grad_norm"
    assert read_log(path)[-1] == {"step": 4, "loss": 0.12345679, "grad_norm": 2}
    assert [row["step"] for row in read_log(path)] == [1, 2, 3, 4]


def test_a_log_cut_short_by_a_crash_loses_only_its_last_partial_row(tmp_path):
    """A final row without its line break is dropped on reopening, the whole rows before it kept."""
    from nextstep.training.logging import CSVLog, read_log

    path = tmp_path / "train_log.csv"
    path.write_text("step,loss\n1,0.5\n2,0.4\n3,0.")
    CSVLog(path, columns=("step", "loss"))
    assert path.read_text() == "step,loss\n1,0.5\n2,0.4\n"
    assert read_log(path) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}]


def test_a_disabled_progress_bar_prints_nothing(capsys):
    """Other ranks and quiet runs draw no bar."""
    from nextstep.training.logging import Progress

    progress = Progress(total=3, enabled=False)
    progress.update(0.5, 100.0)
    progress.close()
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


@given(st.text(max_size=20))
def test_an_override_value_is_everything_after_the_first_equals_sign(raw):
    """A value is read as JSON when it is JSON and as the text written otherwise, '=' signs in it included."""
    from nextstep.training.recipe import apply_overrides

    try:
        expected = json.loads(raw)
    except ValueError:
        expected = raw
    changed = apply_overrides({"data": {"datasets": [{"type": "folder"}]}}, [f"data.datasets.0.path={raw}"])
    assert changed["data"]["datasets"][0] == {"type": "folder", "path": expected}
    assert apply_overrides({}, [f"train.note=a={raw}"]) == {"train": {"note": f"a={raw}"}}


def test_a_checkpoint_of_other_sampling_defaults_resumes_and_one_of_another_model_does_not(tmp_path, tiny_model):
    """The run sets its model's image size, so sampling defaults may differ; its loss weights may not."""
    from nextstep.training.recipe import check_checkpoint_model

    generation = tiny_model.config.generation
    tiny_model.config = tiny_model.config.replace(generation=generation.replace(height=32, width=32, cfg=7.5))
    tiny_model.save_pretrained(tmp_path / "step")
    tiny_model.config = tiny_model.config.replace(generation=generation)
    check_checkpoint_model(tiny_model, tmp_path / "step", "tiny")
    check_checkpoint_model(tiny_model, None, "tiny")
    check_checkpoint_model(tiny_model, tmp_path / "nothing-here", "tiny")
    config = json.loads((tmp_path / "step" / "config.json").read_text())
    config["text_loss_weight"] = 0.5
    (tmp_path / "step" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="configured otherwise than the one the recipe's model 'tiny' builds now"):
        check_checkpoint_model(tiny_model, tmp_path / "step", "tiny")


def test_eval_captions_at_the_model_s_own_size_when_no_size_is_given(tmp_path, tiny_model, monkeypatch):
    """Without --size the captioning suite draws its scenes at the side the model generates."""
    import nextstep.evaluation.shapes_captioning as shapes_captioning

    asked = {}

    def run(model, output, **kwargs):
        asked.update(kwargs)
        return SimpleNamespace(to_dict=lambda: {}, to_markdown=lambda: "")

    monkeypatch.setattr(shapes_captioning, "run_shapes_captioning", run)
    assert (
        main(
            [
                "eval",
                "tiny",
                "--suite",
                "captioning",
                "--output",
                str(tmp_path),
                "--quiet",
                "--scenes-per-group",
                "2",
                "--seed",
                "3",
            ]
        )
        == 0
    )
    side = tiny_model.config.generation.height
    assert (asked["size"], asked["scenes_per_group"], asked["seed"]) == (side, 2, 3)


def test_preference_rounds_refuse_a_recipe_without_preference_before_any_round(tmp_path, capsys, monkeypatch):
    """An ordinary recipe is named as the wrong kind before the rounds start."""
    import nextstep.training.preference_rounds as preference_rounds

    monkeypatch.setattr(
        preference_rounds, "run_preference_rounds", lambda *args, **kwargs: pytest.fail("the rounds started")
    )
    (tmp_path / "recipe.json").write_text(json.dumps(RECIPE))
    assert (
        main(
            [
                "preference-rounds",
                str(tmp_path / "recipe.json"),
                "--rounds",
                "1",
                "--size",
                "32",
                "--output",
                str(tmp_path / "rounds"),
                "--quiet",
            ]
        )
        == 2
    )
    assert "preference rounds need a preference recipe" in capsys.readouterr().err


@pytest.mark.parametrize(
    "preference, accepted",
    [
        ({"beta": 100, "sft_weight": 0}, True),
        ({"beta": 0.5, "sft_weight": 2.5}, True),
        ({}, True),
        ({"beta": 0}, False),
        ({"beta": float("inf")}, False),
        ({"beta": float("nan")}, False),
        ({"beta": True}, False),
        ({"sft_weight": -1}, False),
        ({"sft_weight": float("inf")}, False),
        ({"beta": "100"}, False),
    ],
)
def test_preference_settings_must_be_finite_numbers_in_range(preference, accepted):
    """beta is a finite number > 0, sft_weight a finite number >= 0; booleans and text are no numbers."""
    from nextstep.training.recipe import RecipeConfig

    if accepted:
        assert RecipeConfig.from_dict({"model": "tiny", "preference": preference}).preference == preference
    else:
        with pytest.raises(ValueError, match="preference"):
            RecipeConfig.from_dict({"model": "tiny", "preference": preference})


def test_a_recipe_or_model_written_as_a_path_with_nothing_there_is_named_as_missing(tmp_path, monkeypatch):
    """A path-like name is not looked up among the shipped recipes or the presets."""
    from nextstep.training.recipe import RecipeConfig, find_recipe, recipe_model_source

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="expected a recipe file at ./missing.json, found nothing"):
        find_recipe("./missing.json")
    with pytest.raises(
        FileNotFoundError,
        match="recipe model: expected a model directory or a preset name at './no-model', found nothing",
    ):
        recipe_model_source(RecipeConfig(model="./no-model"))


def test_the_reference_of_a_preference_run_is_compared_only_for_the_same_model(tmp_path):
    """A record of another start model is left to the recipe check; the same model with other files is refused."""
    from nextstep.training.recipe import REFERENCE_FILE, RecipeConfig, check_reference_model

    recipe = RecipeConfig.from_dict({"model": "tiny", "preference": {"beta": 10}})
    (tmp_path / REFERENCE_FILE).write_text(json.dumps({"model": "other", "fingerprint": "aaaa"}))
    check_reference_model(recipe, tmp_path, True, "bbbb")
    (tmp_path / REFERENCE_FILE).write_text(json.dumps({"model": "tiny", "fingerprint": "aaaa"}))
    check_reference_model(recipe, tmp_path, False, "bbbb")
    check_reference_model(recipe, tmp_path, True, "aaaa")
    with pytest.raises(ValueError, match="fingerprint aaaa.*fingerprint bbbb"):
        check_reference_model(recipe, tmp_path, True, "bbbb")


def test_a_folder_without_a_checkpoint_is_refused_only_when_an_entry_holds_results(tmp_path):
    """A log with its header only and an empty folder are no results; any other file or a filled folder is."""
    from nextstep.training.recipe import RecipeConfig, check_resumable

    recipe, entries = RecipeConfig(), ("train_log.csv", "samples", "notes.txt")
    (tmp_path / "train_log.csv").write_text("step,loss\n\n")
    (tmp_path / "samples").mkdir()
    check_resumable(recipe, tmp_path, False, run_entries=entries)
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(ValueError, match=r"holds an earlier run \(notes.txt\) but no checkpoint"):
        check_resumable(recipe, tmp_path, False, run_entries=entries)
    (tmp_path / "notes.txt").unlink()
    (tmp_path / "samples" / "step-1.png").write_text("")
    (tmp_path / "train_log.csv").write_text("step,loss\n1,0.5\n")
    with pytest.raises(ValueError, match=r"holds an earlier run \(samples, train_log.csv\)"):
        check_resumable(recipe, tmp_path, False, run_entries=entries)
