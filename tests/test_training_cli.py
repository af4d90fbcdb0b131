"""``nextstep train``: recipes, overrides, resume, sample grids, and errors that name the problem."""

import json
import re
import shutil

import pytest
from cli_helpers import finished_trainer
from PIL import Image

from nextstep.cli import main
from nextstep.training.logging import read_log
from nextstep.training.recipe import load_recipe

RECIPE = {
    "model": "tiny",
    "data": {"datasets": [{"type": "shapes", "num_samples": 32, "size": 32}], "resolution": 32},
    "train": {"max_steps": 3, "micro_batch_size": 2, "warmup_steps": 1, "learning_rate": 1e-3,
              "log_every": 1, "checkpoint_every": 3, "sample_every": 3,
              "sample_prompts": ["a red circle", "two blue squares"], "sample_height": 32,
              "sample_width": 32, "sample_steps": 2},
}


def test_train_writes_logs_samples_and_checkpoints_then_resumes(tmp_path, capsys):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(RECIPE))
    out = tmp_path / "run"
    assert main(["train", str(recipe), "-o", str(out), "--quiet"]) == 0
    assert [row["step"] for row in read_log(out / "train_log.csv")] == [1, 2, 3]
    assert Image.open(out / "samples" / "step-00000003.png").size == (64, 32)
    assert (out / "checkpoints" / "step-00000003" / "config.json").is_file()
    printed = capsys.readouterr().out
    assert "step-00000003" in printed and f"model: {out / 'model'}" in printed  # --quiet still names the model
    generation = json.loads((out / "model" / "config.json").read_text())["generation"]
    assert (generation["height"], generation["width"]) == (32, 32)  # data.resolution

    assert main(["train", str(recipe), "-o", str(out), "--quiet", "--max-steps", "4",
                 "--set", "train.sample_every=0"]) == 0
    assert [row["step"] for row in read_log(out / "train_log.csv")] == [1, 2, 3, 4]

    # Starting over keeps the earlier run whole, its recipe and model included, beside the new one (and what a
    # tokenizer run left in the folder before it: its tokenizer and evaluation).
    for folder in ("tokenizer", "eval"):
        (out / folder).mkdir()
        (out / folder / "report.json").write_text("{}")
    assert main(["train", str(recipe), "-o", str(out), "--quiet", "--max-steps", "1", "--no-resume",
                 "--set", "train.sample_every=0"]) == 0
    earlier = out / "earlier-runs" / "1"
    assert sorted(p.name for p in earlier.iterdir()) == ["checkpoints", "eval", "model", "recipe.json", "samples",
                                                         "tokenizer", "train_log.csv"]
    assert not (out / "tokenizer").exists() and not (out / "eval").exists()
    assert load_recipe(earlier / "recipe.json").train.max_steps == 4
    assert [row["step"] for row in read_log(out / "train_log.csv")] == [1]
    assert (out / "model" / "config.json").is_file() and load_recipe(out / "recipe.json").train.max_steps == 1


def test_a_resume_that_cannot_continue_the_run_leaves_its_folder_as_it_was(tmp_path, capsys):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(dict(RECIPE, train=dict(RECIPE["train"], sample_every=0))))
    out = tmp_path / "run"
    assert main(["train", str(recipe), "-o", str(out), "--quiet"]) == 0
    saved = (out / "recipe.json").read_text()
    log = (out / "train_log.csv").read_text()
    # Another seed (refused by the trainer), another model or data (refused before the trainer resumes).
    for change, message in ((["--set", "train.seed=5"], "trained with seed 0 but this run has seed 5"),
                            (["--set", "model=compact"], r'was trained with another recipe \(model: "tiny" there, '
                                                         r'"compact" here\)'),
                            (["--set", "data.resolution=64"],
                             "another recipe \\(data.resolution: 32 there, 64 here\\)")):
        assert main(["train", str(recipe), "-o", str(out), "--quiet", "--max-steps", "4", *change]) == 2
        assert re.search(message, capsys.readouterr().err)
        assert (out / "recipe.json").read_text() == saved and (out / "train_log.csv").read_text() == log
    # More steps, same recipe: resumed, and the recipe records the new length.
    assert main(["train", str(recipe), "-o", str(out), "--quiet", "--max-steps", "4"]) == 0
    assert load_recipe(out / "recipe.json").train.max_steps == 4


def test_a_run_that_stopped_before_its_first_step_does_not_block_the_corrected_one(tmp_path, capsys):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(dict(RECIPE, train=dict(RECIPE["train"], sample_every=0))))
    out = tmp_path / "run"
    assert main(["train", str(recipe), "-o", str(out), "--quiet", "--max-steps", "1",
                 "--set", "train.pack_length=8"]) == 2  # refused at the first batch
    assert "more than max_length 8" in capsys.readouterr().err  # the image alone outgrows the rows
    assert main(["train", str(recipe), "-o", str(out), "--quiet", "--max-steps", "1"]) == 0
    assert [row["step"] for row in read_log(out / "train_log.csv")] == [1]


def test_a_resume_in_other_micro_batches_warns_that_it_is_not_exact(tmp_path, caplog):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(dict(RECIPE, train=dict(RECIPE["train"], sample_every=0, checkpoint_every=1))))
    out = tmp_path / "run"
    assert main(["train", str(recipe), "-o", str(out), "--quiet", "--max-steps", "1",
                 "--set", "train.gradient_accumulation=2"]) == 0  # global batch 4 as 2 x 2
    with caplog.at_level("WARNING", logger="nextstep.training"):
        assert main(["train", str(recipe), "-o", str(out), "--quiet", "--max-steps", "2",
                     "--set", "train.micro_batch_size=4"]) == 0  # the same global batch as 4 x 1
    assert "trained in micro-batches of 2 examples and this run takes 4" in caplog.text


def test_data_of_another_sample_kind_is_refused_before_the_run_folder_is_written(tmp_path, capsys):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(dict(RECIPE, train=dict(RECIPE["train"], sample_every=0))))
    out = tmp_path / "run"
    mixed = json.dumps([{"type": "shapes_editing", "num_samples": 8, "size": 32},
                        {"type": "shapes", "num_samples": 8, "size": 32}])
    assert main(["train", str(recipe), "-o", str(out), "--quiet", "--max-steps", "1",
                 "--set", f"data.datasets={mixed}"]) == 2
    assert re.search(r"datasets of one sample kind can be trained together, found several \(.*: editing, .*: "
                     r"text_to_image\)", capsys.readouterr().err)
    assert main(["train", str(recipe), "-o", str(out), "--quiet", "--max-steps", "1",
                 "--set", 'preference={"beta": 500}']) == 2
    assert "a preference recipe trains on preference pairs (a chosen and a rejected image), found text_to_image " \
           "data" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())
    assert main(["train", str(recipe), "-o", str(out), "--quiet", "--max-steps", "1"]) == 0


def test_a_folder_given_as_a_recipe_is_named(tmp_path, capsys, monkeypatch):
    from nextstep.training.recipe import find_recipe

    (tmp_path / "runs").mkdir()
    assert main(["train", str(tmp_path / "runs"), "-o", str(tmp_path / "out")]) == 2
    assert "expected a recipe file at" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="expected a recipe file at runs, found a directory"):
        find_recipe("runs")
    (tmp_path / "tiny_emoji_shapes").mkdir()  # a run folder named after its recipe does not hide the recipe
    assert find_recipe("tiny_emoji_shapes").name == "tiny_emoji_shapes.json"


def test_a_run_folder_without_a_checkpoint_is_not_started_over_silently(tmp_path, capsys):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(dict(RECIPE, train=dict(RECIPE["train"], sample_every=0))))
    out = tmp_path / "run"
    assert main(["train", str(recipe), "-o", str(out), "--quiet"]) == 0
    shutil.rmtree(out / "checkpoints")
    model = (out / "model" / "model.safetensors").read_bytes()
    assert main(["train", str(recipe), "-o", str(out), "--quiet", "--max-steps", "1"]) == 2
    assert "holds an earlier run (model, train_log.csv) but no checkpoint to resume from; pass --no-resume" in \
        capsys.readouterr().err
    assert (out / "model" / "model.safetensors").read_bytes() == model
    assert main(["train", str(recipe), "-o", str(out), "--quiet", "--max-steps", "1", "--no-resume"]) == 0
    assert (out / "earlier-runs" / "1" / "model" / "model.safetensors").read_bytes() == model
    # A checkpoint a crashed save left moved aside counts: the trainer puts it back and resumes from it.
    (out / "checkpoints" / "step-00000001").rename(out / "checkpoints" / "step-00000001.old-x1y2")
    assert main(["train", str(recipe), "-o", str(out), "--quiet", "--max-steps", "2"]) == 0
    assert [row["step"] for row in read_log(out / "train_log.csv")] == [1, 2]


def test_typos_in_recipes_and_overrides_name_the_key(tmp_path, capsys):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(RECIPE))
    assert main(["train", str(recipe), "-o", str(tmp_path), "--set", "train.learnng_rate=1"]) == 2
    assert "learnng_rate" in capsys.readouterr().err
    broken = dict(RECIPE, data={"datasets": [{"type": "shapes", "num_sampels": 3}]})
    recipe.write_text(json.dumps(broken))
    assert main(["train", str(recipe), "-o", str(tmp_path)]) == 2
    assert "num_sampels" in capsys.readouterr().err


def test_missing_caption_is_reported_with_the_file(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (32, 32)).save(folder / "cat.png")
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(dict(RECIPE, data={"datasets": [{"type": "folder", "path": str(folder)}],
                                                     "resolution": 32})))
    assert main(["train", str(recipe), "-o", str(tmp_path / "run"), "--quiet"]) == 2
    assert "cat.png has no caption" in capsys.readouterr().err


def test_shipped_recipes_parse():
    tiny = load_recipe("tiny_emoji_shapes")
    large = load_recipe("nextstep_1_large_256px")
    assert tiny.model == "tiny" and tiny.data.latent_cache
    assert large.train.betas == (0.9, 0.95) and large.train.weight_decay == 0.1
    assert large.train.learning_rate == 1e-4 and large.train.warmup_steps == 5000
    assert large.train.precision == "bf16" and large.train.gradient_checkpointing
    assert large.data.multi_aspect and large.data.resolution == 256 and large.train.pack_length == 8192


def test_a_recipe_can_give_the_model_a_word_vocabulary_fitted_to_its_captions(tmp_path):
    from nextstep.model import NextStep
    from nextstep.training.data.shapes import ShapesConfig, ShapesDataset

    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(dict(RECIPE, text_tokenizer={"type": "word", "min_count": 2})))
    out = tmp_path / "run"
    assert main(["train", str(recipe), "-o", str(out), "--quiet", "--set", "train.sample_every=0"]) == 0
    model = NextStep.from_pretrained(out / "model")
    words = model.text_tokenizer.words
    assert words and {" circle", " square", " triangle"} & set(words)
    assert model.backbone.vocab_size == model.text_tokenizer.vocab_size == 266 + len(words)
    shapes = ShapesDataset(ShapesConfig(num_samples=32, size=32))
    counts = model.text_tokenizer.count_pieces(shapes.caption(i) for i in range(len(shapes)))
    assert set(words) == {piece for piece, n in counts.items() if n >= 2}
    # Resuming fits the same vocabulary again and loads the checkpoint into it.
    assert main(["train", str(recipe), "-o", str(out), "--quiet", "--max-steps", "4",
                 "--set", "train.sample_every=0"]) == 0
    assert [row["step"] for row in read_log(out / "train_log.csv")] == [1, 2, 3, 4]


def test_a_text_tokenizer_without_a_type_is_refused(tmp_path, capsys):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(dict(RECIPE, text_tokenizer={"min_count": 2})))
    assert main(["train", str(recipe), "-o", str(tmp_path / "run"), "--quiet"]) == 2
    assert "text_tokenizer must be a mapping with a 'type' key" in capsys.readouterr().err


def test_only_tokenizers_that_learn_from_captions_need_map_style_data():
    from types import SimpleNamespace

    from nextstep.tokenizers import ByteTextTokenizer
    from nextstep.training.recipe import RecipeConfig, recipe_text_tokenizer

    stream = SimpleNamespace(streaming=True, dataset=None)
    assert isinstance(recipe_text_tokenizer(RecipeConfig(text_tokenizer={"type": "byte"}), stream),
                      ByteTextTokenizer)
    with pytest.raises(ValueError, match="a word text tokenizer is fitted to the captions of map-style data"):
        recipe_text_tokenizer(RecipeConfig(text_tokenizer={"type": "word"}), stream)


def test_an_unknown_text_tokenizer_is_named_when_the_recipe_loads(tmp_path, capsys):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(dict(RECIPE, text_tokenizer={"type": "wrod"})))
    assert main(["train", str(recipe), "-o", str(tmp_path / "run"), "--quiet"]) == 2
    error = capsys.readouterr().err  # other tests may register more tokenizers in this process
    assert "unknown text_tokenizer 'wrod'; known: [" in error and "'byte'" in error and "'word'" in error
    assert not (tmp_path / "run").exists()  # nothing built before the error


def test_the_trained_model_draws_at_its_training_resolution_not_its_preview_size(tmp_path):
    train = dict(RECIPE["train"], max_steps=1, sample_every=0, sample_height=16,
                 sample_width=48)
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(dict(RECIPE, train=train)))
    assert main(["train", str(recipe), "-o", str(tmp_path / "run"), "--quiet"]) == 0
    generation = json.loads((tmp_path / "run" / "model" / "config.json").read_text())["generation"]
    assert (generation["height"], generation["width"]) == (32, 32)


def test_a_recipe_changes_the_model_training_settings_and_they_are_saved(tmp_path):
    from nextstep.builders import build_model
    from nextstep.layers.word_vectors import WordVectorConfig
    from nextstep.presets import tiny
    from nextstep.training.recipe import apply_training_settings, build_recipe_model

    recipe = load_recipe("tiny_emoji_shapes", ["training_settings.image_first_probability=0.5",
                                               "training_settings.text_loss_weight=0.1"])
    model = build_recipe_model(recipe)
    assert (model.config.image_first_probability, model.config.text_loss_weight) == (0.5, 0.1)
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert (saved["image_first_probability"], saved["text_loss_weight"]) == (0.5, 0.1)

    with pytest.raises(ValueError, match="no word vectors"):
        apply_training_settings(model, {"word_vectors.substitution_probability": 0.4})
    with pytest.raises(ValueError, match="image_first_probability.*in \\[0, 1\\]"):
        apply_training_settings(model, {"image_first_probability": 2.0})
    with pytest.raises(ValueError, match="training_settings.*backbone.hidden_size"):
        load_recipe("tiny_emoji_shapes", ["training_settings.backbone.hidden_size=8"])

    config = tiny()
    vocab = config.backbone.config.vocab_size
    with_vectors = build_model(config.replace(word_vectors=WordVectorConfig(count=vocab)))
    apply_training_settings(with_vectors, {"word_vectors.substitution_probability": 0.4})
    assert with_vectors.word_vectors.config.substitution_probability == 0.4
    assert with_vectors.config.word_vectors.substitution_probability == 0.4


def test_overrides_reach_into_lists_and_name_bad_paths():
    import pytest

    from nextstep.training.recipe import apply_overrides

    recipe = {"model": "a", "data": {"datasets": [{"type": "emoji", "size": 64}], "resolution": 64}}
    changed = apply_overrides(recipe, ["data.datasets.0.size=32", "train.max_steps=5", "model=b"])
    assert changed == {"model": "b", "data": {"datasets": [{"type": "emoji", "size": 32}], "resolution": 64},
                       "train": {"max_steps": 5}}
    assert recipe["data"]["datasets"][0]["size"] == 64  # the input is left as it was
    assert apply_overrides({"preference": None}, ["preference.beta=100"]) == {"preference": {"beta": 100}}
    with pytest.raises(ValueError, match=r"data.datasets is a list of 1, expected an index below 1, found '1'"):
        apply_overrides(recipe, ["data.datasets.1.size=32"])
    with pytest.raises(ValueError, match=r"'data.resolution.x': data.resolution is 64, not an object or a list"):
        apply_overrides(recipe, ["data.resolution.x=1"])


def test_a_saved_recipe_is_compared_as_the_recipe_class_reads_it(tmp_path):
    from nextstep.training.recipe import RecipeConfig, check_same_recipe

    nested = RecipeConfig.from_dict({"training_settings": {"word_vectors": {"substitution_probability": 0.4}}})
    saved = nested.to_dict()
    del saved["preference"]  # written before the field existed
    saved["training_settings"] = {"word_vectors.substitution_probability": 0.4}  # the dotted spelling
    (tmp_path / "recipe.json").write_text(json.dumps(saved))
    check_same_recipe(nested, tmp_path)
    with pytest.raises(ValueError, match=r"training_settings.word_vectors.substitution_probability: 0.4 there, 0.5 "
                                         r"here"):
        check_same_recipe(nested.replace(training_settings={"word_vectors.substitution_probability": 0.5}),
                          tmp_path)


def test_dataset_specs_are_compared_as_their_datasets_read_them(tmp_path):
    from nextstep.training.recipe import RecipeConfig, check_same_recipe
    from nextstep.training.tokenizer_recipe import TokenizerRecipeConfig

    def recipe(spec):
        return RecipeConfig.from_dict({"data": {"datasets": [spec], "resolution": 32}})

    plain = {"type": "shapes", "num_samples": 32, "size": 32}
    (tmp_path / "recipe.json").write_text(recipe(plain).to_json())
    check_same_recipe(recipe({**plain, "seed": 0}), tmp_path)  # a default spelt out
    check_same_recipe(recipe({**plain, "repeat": 1}), tmp_path)
    with pytest.raises(ValueError, match=r"trained with another recipe \(data.datasets.0.repeat: 1 there, 2 here\)"):
        check_same_recipe(recipe({**plain, "repeat": 2}), tmp_path)
    with pytest.raises(ValueError, match=r"another recipe \(data.datasets.0.num_samples: 32 there, 33 here\)"):
        check_same_recipe(recipe({**plain, "num_samples": 33}), tmp_path)  # the difference, however long the spec
    with pytest.raises(ValueError, match=r"holds a run of another kind \(its recipe.json is a RecipeConfig, this "
                                         r"recipe a TokenizerRecipeConfig\)"):
        check_same_recipe(TokenizerRecipeConfig(), tmp_path)


def test_a_resume_whose_model_folder_was_configured_otherwise_since_is_refused(tmp_path, capsys):
    from nextstep import build_model

    start = tmp_path / "start"
    build_model("tiny", seed=0).save_pretrained(start)
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(dict(RECIPE, model=str(start), train=dict(RECIPE["train"], sample_every=0))))
    out = tmp_path / "run"
    assert main(["train", str(recipe), "-o", str(out), "--quiet", "--max-steps", "1"]) == 0
    config = json.loads((start / "config.json").read_text())
    config["text_loss_weight"] = 0.5
    (start / "config.json").write_text(json.dumps(config))
    log = (out / "train_log.csv").read_text()
    assert main(["train", str(recipe), "-o", str(out), "--quiet", "--max-steps", "2"]) == 2
    assert "configured otherwise than the one the recipe's model" in (err := capsys.readouterr().err)
    assert "text_loss_weight: 0.01 there, 0.5 here" in err
    assert (out / "train_log.csv").read_text() == log
    config["text_loss_weight"] = 0.01  # as it was: the run goes on
    (start / "config.json").write_text(json.dumps(config))
    assert main(["train", str(recipe), "-o", str(out), "--quiet", "--max-steps", "2"]) == 0


def test_a_preset_argument_spelt_at_its_default_is_the_same_recipe(tmp_path):
    from nextstep.training.recipe import RecipeConfig, check_same_recipe

    data = dict(RECIPE, model="compact", model_arguments={"hidden_size": 64})
    RecipeConfig.from_dict(data).save(tmp_path / "recipe.json")
    check_same_recipe(RecipeConfig.from_dict(dict(data, model_arguments={"hidden_size": 64, "num_layers": 4})),
                      tmp_path)
    with pytest.raises(ValueError, match=r"model_arguments.num_layers: 4 there, 2 here"):
        check_same_recipe(RecipeConfig.from_dict(dict(data, model_arguments={"hidden_size": 64, "num_layers": 2})),
                          tmp_path)


def test_a_resume_may_switch_gradient_checkpointing(tmp_path):
    """A train setting that the run writes into the backbone's config is not a change of model."""
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(dict(RECIPE, train=dict(RECIPE["train"], sample_every=0))))
    out = tmp_path / "run"
    assert main(["train", str(recipe), "-o", str(out), "--quiet", "--max-steps", "1"]) == 0
    assert main(["train", str(recipe), "-o", str(out), "--quiet", "--max-steps", "2",
                 "--set", "train.gradient_checkpointing=true"]) == 0
    assert main(["train", str(recipe), "-o", str(out), "--quiet", "--max-steps", "3"]) == 0


def test_a_recipe_of_another_preset_is_refused_by_its_name_alone(tmp_path):
    from nextstep.training.recipe import RecipeConfig, check_same_recipe

    RecipeConfig.from_dict(RECIPE).save(tmp_path / "recipe.json")
    with pytest.raises(ValueError, match=r'another recipe \(model: "tiny" there, "compact" here\); pass'):
        check_same_recipe(RecipeConfig.from_dict(dict(RECIPE, model="compact")), tmp_path)


def test_a_text_tokenizer_counts_the_captions_of_a_repeated_dataset_once_per_repeat():
    from types import SimpleNamespace

    from nextstep.training.data.shapes import ShapesConfig, ShapesDataset
    from nextstep.training.data.source import build_datasets, combine
    from nextstep.training.recipe import RecipeConfig, recipe_text_tokenizer

    recipe = RecipeConfig.from_dict({"text_tokenizer": {"type": "word", "min_count": 2}, "data": {
        "datasets": [{"type": "shapes", "num_samples": 1, "size": 32, "repeat": 2}], "resolution": 32}})
    datasets, repeats = build_datasets(recipe.data)
    tokenizer = recipe_text_tokenizer(recipe, SimpleNamespace(streaming=False, dataset=combine(datasets, repeats)))
    caption = ShapesDataset(ShapesConfig(num_samples=1, size=32)).caption(0)
    assert set(tokenizer.words) == set(tokenizer.count_pieces([caption])) != set()


def test_a_resume_with_another_text_tokenizer_is_refused_naming_it(tmp_path):
    from nextstep.training.recipe import RecipeConfig, check_resumable

    first = RecipeConfig.from_dict(dict(RECIPE, text_tokenizer={"type": "word", "min_count": 2}))
    first.save(tmp_path / "recipe.json")
    check_resumable(first, tmp_path, True)
    other = RecipeConfig.from_dict(dict(RECIPE, text_tokenizer={"type": "word", "min_count": 3}))
    with pytest.raises(ValueError, match=r"trained with another recipe \(text_tokenizer\.min_count: 2 there, 3 here\)"):
        check_resumable(other, tmp_path, True)


def test_a_refused_run_writes_no_recipe_into_a_folder_that_had_none(tmp_path, capsys):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(dict(RECIPE, train=dict(RECIPE["train"], sample_every=0))))
    out = tmp_path / "run"
    out.mkdir()
    (out / "train_log.csv").write_text("step,loss\n1,2.5\n")  # an earlier run's log, without its checkpoints
    assert main(["train", str(recipe), "-o", str(out), "--quiet", "--max-steps", "1"]) == 2
    assert "holds an earlier run (train_log.csv) but no checkpoint to resume from" in capsys.readouterr().err
    assert not (out / "recipe.json").exists()
    assert (out / "train_log.csv").read_text() == "step,loss\n1,2.5\n"


def test_a_recipe_builds_its_preset_with_its_model_arguments():
    from nextstep.training.recipe import RecipeConfig, build_recipe_model

    recipe = RecipeConfig.from_dict(dict(RECIPE, model="compact", model_arguments={
        "hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "head_width": 32, "head_depth": 1}))
    backbone = build_recipe_model(recipe).config.backbone.to_dict()
    assert (backbone["hidden_size"], backbone["num_layers"], backbone["num_heads"]) == (32, 1, 2)


def test_train_passes_resume_and_quiet_on_and_defaults_to_a_folder_named_after_the_recipe(tmp_path, capsys,
                                                                                          monkeypatch):
    from pathlib import Path

    calls = []
    monkeypatch.setattr("nextstep.training.recipe.run_recipe",
                        lambda recipe, output, **kwargs: calls.append((output, kwargs)) or finished_trainer())
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_recipe.json").write_text(json.dumps(RECIPE))
    assert main(["train", "my_recipe.json", "--quiet"]) == 0
    assert calls[-1] == (Path("outputs/train/my_recipe"), {"resume": True, "show_progress": False})
    assert main(["train", "my_recipe.json", "--no-resume"]) == 0
    assert calls[-1][1] == {"resume": False, "show_progress": True}
    assert f"log: {Path('outputs/train/my_recipe/train_log.csv')}" in capsys.readouterr().out


def test_train_prints_its_files_from_the_main_process_only(tmp_path, capsys, monkeypatch):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(RECIPE))
    (tmp_path / "run" / "model").mkdir(parents=True)
    latest = tmp_path / "run" / "checkpoints" / "step-00000003"
    monkeypatch.setattr("nextstep.training.recipe.run_recipe",
                        lambda recipe, output, **kwargs: finished_trainer(is_main=False, latest=latest))
    assert main(["train", str(recipe), "-o", str(tmp_path / "run"), "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    monkeypatch.setattr("nextstep.training.recipe.run_recipe",
                        lambda recipe, output, **kwargs: finished_trainer(latest=latest))
    assert main(["train", str(recipe), "-o", str(tmp_path / "run"), "--quiet"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"log: {tmp_path / 'run' / 'train_log.csv'}",
                                                    f"checkpoint: {latest}", f"model: {tmp_path / 'run' / 'model'}"]


def test_train_tokenizer_names_the_tokenizer_folder_it_wrote(tmp_path, capsys, monkeypatch):
    def run(recipe, output, **kwargs):
        (output / "tokenizer").mkdir(parents=True)
        return finished_trainer()

    monkeypatch.setattr("nextstep.training.tokenizer_recipe.load_tokenizer_recipe", lambda name, overrides: name)
    monkeypatch.setattr("nextstep.training.tokenizer_recipe.run_tokenizer_recipe", run)
    assert main(["train-tokenizer", "any", "-o", str(tmp_path / "run"), "--quiet"]) == 0
    assert f"tokenizer: {tmp_path / 'run' / 'tokenizer'}" in capsys.readouterr().out


def test_data_too_damaged_to_train_on_ends_the_run_with_its_reason(tmp_path, capsys, monkeypatch):
    from nextstep.training.data.base import DataQualityError

    def run(recipe, output, **kwargs):
        raise DataQualityError("12 of 20 images could not be read")

    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(RECIPE))
    monkeypatch.setattr("nextstep.training.recipe.run_recipe", run)
    assert main(["train", str(recipe), "-o", str(tmp_path / "run"), "--quiet"]) == 2
    assert "nextstep train: error: 12 of 20 images could not be read" in capsys.readouterr().err


def test_preference_rounds_pass_their_options_on_and_default_to_a_folder_named_after_the_recipe(tmp_path, capsys,
                                                                                                monkeypatch):
    from pathlib import Path

    import nextstep.training.preference_rounds as preference_rounds

    asked = {}
    monkeypatch.setattr(preference_rounds, "run_preference_rounds",
                        lambda recipe, output, **kwargs: asked.update(kwargs, output=output) or [])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rounds_recipe.json").write_text(json.dumps({
        "model": "tiny", "preference": {"beta": 100}, "train": {"max_steps": 1},
        "data": {"datasets": [{"type": "preference_manifest", "path": "set-by-each-round"}], "resolution": 32}}))
    assert main(["preference-rounds", "rounds_recipe.json", "--rounds", "3", "--size", "32", "--device", "meta",
                 "--combinations", "all", "--quiet"]) == 0
    assert asked["output"] == Path("outputs/preference-rounds/rounds_recipe")
    assert (asked["rounds"], asked["device"], asked["combinations"], asked["show_progress"]) == (3, "meta", "all",
                                                                                                 False)
    assert f"wrote {Path('outputs/preference-rounds/rounds_recipe/rounds.json')}" in capsys.readouterr().out
