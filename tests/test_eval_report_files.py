"""The files every evaluation suite writes: strict JSON, with undefined numbers as null."""

import json
import math

import pytest

from nextstep.evaluation.report_files import strict_json_data, write_report_files


def _strict_loads(text):
    def refuse(token):
        raise AssertionError(f"{token} is not strict JSON")

    return json.loads(text, parse_constant=refuse)


class _Report:
    def __init__(self, data):
        self.data = data

    def to_dict(self):
        return self.data

    def to_markdown(self):
        return f"ratio {self.data['ratio']:.2f}"


def test_undefined_numbers_are_written_as_null_at_any_depth(tmp_path):
    data = {"ratio": float("nan"), "psnr": float("inf"), "fine": 1.5, "count": 3,
            "by_vocabulary": {"unknown": {"count": 0, "real": float("nan"), "generated": float("nan")}},
            "robustness": [1.0, float("-inf"), (2.0, float("inf"))], "name": "nan"}
    output = write_report_files(str(tmp_path / "out"), _Report(data),
                                [{"index": 0, "score": float("nan")}, {"index": 1, "score": 0.5}])
    saved = _strict_loads((output / "report.json").read_text())
    assert saved == {"ratio": None, "psnr": None, "fine": 1.5, "count": 3,
                     "by_vocabulary": {"unknown": {"count": 0, "real": None, "generated": None}},
                     "robustness": [1.0, None, [2.0, None]], "name": "nan"}
    lines = [_strict_loads(line) for line in (output / "results.jsonl").read_text().splitlines()]
    assert lines == [{"index": 0, "score": None}, {"index": 1, "score": 0.5}]
    assert (output / "report.md").read_text() == "ratio nan\n"
    assert math.isnan(data["ratio"])  # the report itself is left as it was


def test_the_emoji_report_with_no_real_recall_is_strict_json(tmp_path):
    from nextstep.evaluation.emoji_eval import EmojiReport, _ratio

    report = EmojiReport(count=4, frechet_generated=3.0, frechet_real=0.0, frechet_ratio=float("inf"),
                         retrieval_real={"R@1": 0.0, "R@10": 0.0}, retrieval_generated={"R@1": 0.0, "R@10": 0.0},
                         retrieval_ratio=_ratio(0.0, 0.0), frechet_reconstructed=1.0,
                         retrieval_reconstructed={"R@1": 0.0, "R@10": 0.0}, ridge_alpha=1.0)
    write_report_files(tmp_path, report)
    saved = _strict_loads((tmp_path / "report.json").read_text())
    assert saved["frechet_ratio"] is None and saved["retrieval_ratio"] is None


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_strict_json_data_keeps_finite_values_and_drops_undefined_ones(value):
    assert strict_json_data({"a": [value, 0.25, True, None]}) == {"a": [None, 0.25, True, None]}
