"""Preference pairs from a model's own samples: every wrong image is paired with a right one of its prompt."""

import json

import pytest
from PIL import Image

from nextstep.evaluation import self_judged_pairs
from nextstep.evaluation.sampling import SamplingSettings
from nextstep.evaluation.self_judged_pairs import write_self_judged_pairs
from nextstep.training.data import PreferenceManifestDataset
from nextstep.training.data.preferences import PreferenceManifestConfig


def test_wrong_samples_become_rejected_sides_of_pairs_the_manifest_reads(tiny_model, tmp_path, monkeypatch):
    entries = [{"tag": "colors", "prompt": prompt, "include": []}
               for prompt in ("a red circle", "a blue square", "a green triangle")]
    monkeypatch.setattr(self_judged_pairs, "geneval_prompts", lambda combinations: entries)
    drawn = []

    def images(model, prompts, settings, progress=None):
        drawn.extend(prompts)
        return [Image.new("RGB", (32, 32), (index, 0, 0)) for index in range(len(prompts))]

    # Prompt 0: images 0-2 right, 3 wrong; prompt 1: all right; prompt 2: 8 and 9 wrong, 10 and 11 right.
    verdicts = {3: False, 8: False, 9: False}
    monkeypatch.setattr(self_judged_pairs, "generate_images", images)
    monkeypatch.setattr(self_judged_pairs, "detect_shapes", lambda image: image.getpixel((0, 0))[0])
    monkeypatch.setattr(self_judged_pairs, "score_image", lambda index, entry: (verdicts.get(index, True), ""))
    summary = write_self_judged_pairs(tiny_model, tmp_path, samples_per_prompt=4,
                                      settings=SamplingSettings(height=32, width=32))
    assert drawn == ["a red circle"] * 4 + ["a blue square"] * 4 + ["a green triangle"] * 4
    assert (summary.pairs, summary.prompts_with_pairs, summary.images) == (3, 2, 12)
    assert summary.correct == pytest.approx(9 / 12)
    lines = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert lines == [
        {"caption": "a red circle", "chosen": "images/000000.png", "rejected": "images/000003.png"},
        {"caption": "a green triangle", "chosen": "images/000010.png", "rejected": "images/000008.png"},
        {"caption": "a green triangle", "chosen": "images/000011.png", "rejected": "images/000009.png"},
    ]
    pairs = PreferenceManifestDataset(PreferenceManifestConfig(str(tmp_path / "pairs.jsonl")))
    assert len(pairs) == 3 and pairs.load(1).rejected_image.getpixel((0, 0))[0] == 8
    assert json.loads((tmp_path / "summary.json").read_text())["pairs"] == 3


def test_pairs_are_written_as_one_folder_that_replaces_an_earlier_one_whole(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(self_judged_pairs, "generate_images",
                        lambda model, prompts, settings, progress=None: [Image.new("RGB", (8, 8))] * len(prompts))
    alternate = iter([True, False] * 100)
    options = dict(samples_per_prompt=2, settings=SamplingSettings(height=32, width=32),
                   judge=lambda image, entry: next(alternate))
    write_self_judged_pairs(tiny_model, tmp_path / "pairs", prompts=["a", "b", "c"], **options)
    assert len(list((tmp_path / "pairs" / "images").iterdir())) == 6
    write_self_judged_pairs(tiny_model, tmp_path / "pairs", prompts=["a"], **options)
    assert sorted(p.name for p in (tmp_path / "pairs" / "images").iterdir()) == ["000000.png", "000001.png"]
    before = (tmp_path / "pairs" / "pairs.jsonl").read_text()

    def crash(*args, **kwargs):
        raise OSError(28, "no space left on device")

    monkeypatch.setattr(Image.Image, "save", crash)  # a write that fails midway leaves the earlier folder
    with pytest.raises(OSError, match="no space left"):
        write_self_judged_pairs(tiny_model, tmp_path / "pairs", prompts=["x", "y"], **options)
    assert (tmp_path / "pairs" / "pairs.jsonl").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs"]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    monkeypatch.undo()
    monkeypatch.setattr(self_judged_pairs, "generate_images", lambda *args, **kwargs: pytest.fail("drew"))
    with pytest.raises(FileExistsError, match="found a folder of 1 other entries \\(todo.txt\\)"):
        write_self_judged_pairs(tiny_model, tmp_path / "notes", prompts=["a"], **options)


def test_a_real_model_writes_pairs_end_to_end(tiny_model, tmp_path, monkeypatch):
    first_prompts = self_judged_pairs.geneval_prompts("seen")[:6]
    monkeypatch.setattr(self_judged_pairs, "geneval_prompts", lambda combinations: first_prompts)
    summary = write_self_judged_pairs(tiny_model, tmp_path, samples_per_prompt=2,
                                      settings=SamplingSettings(height=32, width=32, num_steps=1, batch_size=64))
    assert (summary.prompts, summary.images) == (6, 12)
    assert len((tmp_path / "pairs.jsonl").read_text().splitlines()) == summary.pairs
    with pytest.raises(ValueError, match="samples_per_prompt must be an integer >= 2"):
        write_self_judged_pairs(tiny_model, tmp_path, samples_per_prompt=1)


def test_the_command_draws_with_the_model_settings_and_the_options_given(tiny_model, tmp_path, monkeypatch, capsys):
    from nextstep.cli import main

    first_prompts = self_judged_pairs.geneval_prompts("seen")[:3]
    asked = []
    monkeypatch.setattr(self_judged_pairs, "geneval_prompts",
                        lambda combinations: asked.append(combinations) or first_prompts)
    tiny_model.save_pretrained(tmp_path / "model")
    code = main(["preference-pairs", str(tmp_path / "model"), str(tmp_path / "pairs"), "--samples-per-prompt", "2",
                 "--size", "32", "--steps", "1", "--seed", "7", "--quiet"])
    assert code == 0 and asked == ["seen"]
    summary = json.loads((tmp_path / "pairs" / "summary.json").read_text())
    assert summary["images"] == 6 and f"{summary['pairs']} pairs from" in capsys.readouterr().out
    generation = tiny_model.config.generation
    assert summary["settings"] == {**summary["settings"], "height": 32, "width": 32, "num_steps": 1, "seed": 7,
                                   "cfg": generation.cfg, "cfg_schedule": generation.cfg_schedule}
    assert main(["preference-pairs", str(tmp_path / "model"), str(tmp_path / "none"),
                 "--samples-per-prompt", "1", "--size", "32"]) == 2
    assert "samples_per_prompt must be an integer >= 2" in capsys.readouterr().err


def test_any_prompts_and_judge_can_replace_the_shapes_ones(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(self_judged_pairs, "generate_images", lambda model, prompts, settings, progress=None: [
        Image.new("RGB", (32, 32), (index * 40, 0, 0)) for index in range(len(prompts))])
    seen = []

    def bright_enough(image, entry):
        seen.append(entry)
        return image.getpixel((0, 0))[0] >= entry.get("threshold", 0)

    summary = write_self_judged_pairs(tiny_model, tmp_path, samples_per_prompt=3, judge=bright_enough,
                                      prompts=["a red glow", {"prompt": "a redder glow", "threshold": 160}],
                                      settings=SamplingSettings(height=32, width=32))
    # Prompt 0 (images 0-2) is always right; prompt 1 (images 3-5: red 120, 160, 200) has one wrong image.
    assert seen == [{"prompt": "a red glow"}] * 3 + [{"prompt": "a redder glow", "threshold": 160}] * 3
    assert (summary.prompts, summary.pairs, summary.prompts_with_pairs) == (2, 1, 1)
    assert json.loads((tmp_path / "pairs.jsonl").read_text()) == {
        "caption": "a redder glow", "chosen": "images/000004.png", "rejected": "images/000003.png"}
    # Two entries of one text, each with a pair: two prompts with pairs.
    twice = write_self_judged_pairs(tiny_model, tmp_path / "twice", samples_per_prompt=3, judge=bright_enough,
                                    prompts=[{"prompt": "a glow", "threshold": 40}, {"prompt": "a glow",
                                                                                     "threshold": 160}],
                                    settings=SamplingSettings(height=32, width=32))
    assert (twice.pairs, twice.prompts_with_pairs) == (2, 2)
    with pytest.raises(ValueError, match="each prompt must be a string or a dict with a string 'prompt'"):
        write_self_judged_pairs(tiny_model, tmp_path, prompts=[{"text": "a red glow"}], judge=bright_enough)


def test_the_command_reads_prompt_files_and_judges_by_name(tiny_model, tmp_path, monkeypatch, capsys):
    from nextstep.cli import main

    judged = []
    monkeypatch.setitem(self_judged_pairs.JUDGES, "odd", lambda image, entry: judged.append(entry) or len(judged) % 2)
    tiny_model.save_pretrained(tmp_path / "model")
    (tmp_path / "prompts.txt").write_text("a red circle\n\n  two squares \n")
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "a red circle", "want": "red"}\n')
    options = ["--samples-per-prompt", "2", "--size", "32", "--steps", "1", "--quiet", "--judge", "odd"]
    assert main(["preference-pairs", str(tmp_path / "model"), str(tmp_path / "a"),
                 "--prompts", str(tmp_path / "prompts.txt"), *options]) == 0
    assert judged == [{"prompt": "a red circle"}] * 2 + [{"prompt": "two squares"}] * 2
    assert len((tmp_path / "a" / "pairs.jsonl").read_text().splitlines()) == 2  # one right, one wrong each
    assert main(["preference-pairs", str(tmp_path / "model"), str(tmp_path / "b"),
                 "--prompts", str(tmp_path / "prompts.jsonl"), *options]) == 0
    assert judged[-1] == {"prompt": "a red circle", "want": "red"}
    capsys.readouterr()
    assert main(["preference-pairs", str(tmp_path / "model"), str(tmp_path / "c"), "--judge", "nobody"]) == 2
    assert "judge must be one of ['odd', 'shapes'], found 'nobody'" in capsys.readouterr().err
    assert main(["preference-pairs", str(tmp_path / "model"), str(tmp_path / "c"), "--prompts", "none.txt"]) == 2
    assert "expected a prompt file at none.txt" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"text": "a red circle"}\n')
    assert main(["preference-pairs", str(tmp_path / "model"), str(tmp_path / "c"),
                 "--prompts", str(tmp_path / "bad.jsonl")]) == 2
    assert "bad.jsonl line 1: missing or non-string ['prompt']" in capsys.readouterr().err


def test_the_shapes_judge_refuses_prompts_of_your_own_before_drawing(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(self_judged_pairs, "generate_images", lambda *args, **kwargs: pytest.fail("drew images"))
    with pytest.raises(ValueError, match="the shapes judge reads GenEval entries .* give a judge of your own"):
        write_self_judged_pairs(tiny_model, tmp_path, prompts=["a red circle"])


def test_no_prompts_are_refused_before_the_output_folder_is_touched(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(self_judged_pairs, "generate_images", lambda *args, **kwargs: pytest.fail("drew images"))
    with pytest.raises(ValueError, match="prompts must hold at least one prompt, found none"):
        write_self_judged_pairs(tiny_model, tmp_path / "pairs", prompts=[], judge=lambda image, entry: True)
    assert not (tmp_path / "pairs").exists()
