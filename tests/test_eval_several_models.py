"""`nextstep eval` of several models: one folder each, the emoji suite prepared once, a comparison beside them."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nextstep.cli import main
from nextstep.evaluation.model_comparison import HEADLINES, comparison_markdown, comparison_row, headline_numbers


@pytest.fixture
def quick_suites(monkeypatch):
    """Shapes, tokenizer and emoji suites that return fixed headline numbers at once; what each was asked
    (``"runs"``: suite and output folder; ``"prepared"``: the emoji suites' sizes and limits)."""
    import nextstep.evaluation.emoji_eval as emoji_eval
    import nextstep.evaluation.shapes_geneval as shapes_geneval
    import nextstep.evaluation.tokenizer_report as tokenizer_report

    asked = {"runs": [], "prepared": []}

    def report(output, name, numbers):
        output.mkdir(parents=True, exist_ok=True)
        (output / "report.md").write_text(f"{name} table\n")
        return SimpleNamespace(to_dict=lambda: dict(numbers), to_markdown=lambda: f"{name} table")

    def shapes(model, output, settings, **kwargs):
        asked["runs"].append(("shapes", output.parent.name, settings.num_steps))
        return report(output, "shapes", {"overall": 0.5 + settings.num_steps / 100})

    def tokenizer(image_tokenizer, output, **kwargs):
        asked["runs"].append(("tokenizer", output.parent.name, kwargs["size"]))
        return report(output, "tokenizer", {"psnr": 20.0, "ssim": math.nan})

    class HeldOutEmoji:
        def __init__(self, size, limit):
            asked["prepared"].append((size, limit))

        def __call__(self, model, settings, output, progress=None):
            asked["runs"].append(("emoji", output.parent.name, settings.height))
            return report(output, "emoji", {"retrieval_ratio": 0.4, "frechet_ratio": 2.5})

    monkeypatch.setattr(shapes_geneval, "run_shapes_geneval", shapes)
    monkeypatch.setattr(tokenizer_report, "run_tokenizer_evaluation", tokenizer)
    monkeypatch.setattr(emoji_eval, "HeldOutEmoji", HeldOutEmoji)
    return asked


def _save(model, folder, **generation):
    model.config = model.config.replace(generation=model.config.generation.replace(**generation))
    model.save_pretrained(folder)
    return str(folder)


def test_several_models_are_evaluated_into_a_folder_each_with_a_comparison(tmp_path, quick_suites, capsys):
    from nextstep import build_model

    student = _save(build_model("tiny", seed=1), tmp_path / "models" / "student", num_steps=4, cfg=1.0,
                    height=32, width=32)
    out = tmp_path / "eval"
    assert main(["eval", "tiny", student, "--suite", "shapes", "emoji", "tokenizer", "--limit", "12",
                 "--output", str(out), "--quiet"]) == 0
    # Each model with its own defaults (the preset at 256 pixels and 50 steps, the student at 32 and 4); the emoji
    # suite prepared once per image side.
    assert quick_suites["runs"] == [("shapes", "tiny", 50), ("emoji", "tiny", 256), ("tokenizer", "tiny", 256),
                                    ("shapes", "student", 4), ("emoji", "student", 32), ("tokenizer", "student", 32)]
    assert quick_suites["prepared"] == [(256, 12), (32, 12)]
    for name in ("tiny", "student"):
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["model"] == {"tiny": "tiny", "student": student}[name]
        assert set(summary) == {"model", "settings", "shapes", "emoji", "tokenizer"}
        assert json.loads((out / name / "evaluation.json").read_text())["running"] == {}
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["models"] == ["tiny", student]
    assert [row["folder"] for row in comparison["rows"]] == ["tiny", "student"]
    assert comparison["rows"][1]["headlines"] == {"shapes overall": 0.54, "emoji R@10 ratio": 0.4,
                                                  "emoji Frechet ratio": 2.5, "tokenizer PSNR": 20.0,
                                                  "tokenizer SSIM": None}
    table = (out / "comparison.md").read_text()
    assert f"| {student} | 1.0 | 4 | 0.540 | 0.400 | 2.500 | 20.00 | n/a |" in table
    assert "| tiny | 7.5 | 50 | 1.000 |" in table
    assert table.endswith("Higher is better; lower is better for emoji Frechet ratio.\n")
    assert table.removeprefix("# Evaluation of 2 models\n\n") in capsys.readouterr().out


def test_the_same_images_size_for_every_model_prepares_the_emoji_suite_once(tmp_path, quick_suites):
    from nextstep import build_model

    other = _save(build_model("tiny", seed=1), tmp_path / "other", num_steps=4)
    assert main(["eval", "tiny", other, "tiny", "--suite", "emoji", "--size", "32", "--output", str(tmp_path / "e"),
                 "--quiet"]) == 0
    assert quick_suites["prepared"] == [(32, None)]  # the model named twice is evaluated once
    assert [run[1] for run in quick_suites["runs"]] == ["tiny", "other"]


def test_names_that_are_no_model_or_share_a_folder_are_refused_before_any_model_runs(tmp_path, quick_suites, capsys):
    from nextstep import build_model

    first = _save(build_model("tiny", seed=0), tmp_path / "a" / "model")
    second = _save(build_model("tiny", seed=1), tmp_path / "b" / "model")
    common = ["--suite", "shapes", "--size", "32", "--output", str(tmp_path / "eval"), "--quiet"]
    assert main(["eval", "tiny", first, second] + common) == 2
    assert f"models {first!r} and {second!r} would both be evaluated into {tmp_path / 'eval' / 'model'}" in \
        capsys.readouterr().err
    assert main(["eval", "tiny", "no-such-model"] + common) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
    assert quick_suites["runs"] == [] and not (tmp_path / "eval").exists()


def test_a_comparison_of_other_models_is_not_replaced_without_overwrite(tmp_path, quick_suites, capsys):
    from nextstep import build_model

    other = _save(build_model("tiny", seed=1), tmp_path / "other")
    out = tmp_path / "eval"
    common = ["--suite", "shapes", "--size", "32", "--output", str(out), "--quiet"]
    assert main(["eval", "tiny", other] + common) == 0
    assert main(["eval", "tiny", other] + common) == 0  # the same models again: their comparison is rewritten
    assert main(["eval", other, "tiny"] + common) == 2
    assert f"already holds comparison.json and 1 more from another comparison (with other settings: models " \
           f"['tiny', {other!r}] there, [{other!r}, 'tiny'] here)" in capsys.readouterr().err
    assert len(quick_suites["runs"]) == 4
    assert main(["eval", other, "tiny", "--overwrite"] + common) == 0
    assert json.loads((out / "comparison.json").read_text())["models"] == [other, "tiny"]


def test_skip_finished_runs_only_the_suites_not_finished_with_the_same_options(tmp_path, quick_suites, capsys):
    """After an interruption, --skip-finished goes on where the run stopped; without it every suite runs again."""
    import nextstep.evaluation.tokenizer_report as tokenizer_report
    from nextstep import build_model

    other = _save(build_model("tiny", seed=1), tmp_path / "other")
    out = tmp_path / "eval"
    common = ["eval", "tiny", other, "--suite", "shapes", "tokenizer", "--size", "32", "--output", str(out), "--quiet"]
    quick = tokenizer_report.run_tokenizer_evaluation

    def interrupted(image_tokenizer, output, **kwargs):
        if output.parent.name == "other":
            raise KeyboardInterrupt
        return quick(image_tokenizer, output, **kwargs)

    tokenizer_report.run_tokenizer_evaluation = interrupted
    assert main(common) == 130
    tokenizer_report.run_tokenizer_evaluation = quick
    assert [run[:2] for run in quick_suites["runs"]] == [("shapes", "tiny"), ("tokenizer", "tiny"), ("shapes", "other")]
    quick_suites["runs"].clear()
    assert main(common + ["--skip-finished"]) == 0
    assert [run[:2] for run in quick_suites["runs"]] == [("tokenizer", "other")]
    assert "tiny: shapes, tokenizer: finished earlier" in capsys.readouterr().out
    rows = json.loads((out / "comparison.json").read_text())["rows"]
    assert [sorted(row["headlines"]) for row in rows] == [["shapes overall", "tokenizer PSNR", "tokenizer SSIM"]] * 2
    quick_suites["runs"].clear()
    assert main(common + ["--skip-finished", "--crops", "3"]) == 2  # other options: refused, as without it
    assert "with other settings: suites" in capsys.readouterr().err
    assert main(common + ["--skip-finished", "--crops", "3", "--overwrite"]) == 0  # only that suite runs again
    assert [run[:2] for run in quick_suites["runs"]] == [("tokenizer", "tiny"), ("tokenizer", "other")]
    quick_suites["runs"].clear()
    assert main(common + ["--crops", "3"]) == 0
    assert len(quick_suites["runs"]) == 4


summaries = st.fixed_dictionaries({}, optional={
    suite: st.fixed_dictionaries({}, optional={key: st.one_of(st.none(), st.floats()) for _, key, _ in headlines})
    for suite, headlines in HEADLINES.items()})


@given(summaries)
def test_a_row_holds_every_headline_of_the_suites_a_summary_has_and_none_where_undefined(summary):
    numbers = headline_numbers(summary)
    expected = {column: key for suite, headlines in HEADLINES.items() if suite in summary
                for column, key, _ in headlines}
    assert set(numbers) == set(expected)
    for column, value in numbers.items():
        found = next(results.get(expected[column]) for suite, results in summary.items()
                     if any(column == c for c, _, _ in HEADLINES[suite]))
        assert value == (found if found is not None and math.isfinite(found) else None)
    table = comparison_markdown([comparison_row("m", "m", summary)])
    assert table.splitlines()[0].count("|") == 4 + len(numbers)
