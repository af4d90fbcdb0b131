"""benchmarks/guidance_sweep.py chooses guidance on seen prompts and only then scores held-out ones."""

import json

from benchmark_helpers import load_benchmark


def test_sweep_writes_the_choice_and_its_held_out_scores(tmp_path):
    script = load_benchmark("guidance_sweep")
    assert script.main(["--model", "tiny", "--images-per-tag", "1", "--scales", "1,2", "--steps", "1",
                        "--size", "32", "--batch-size", "6", "--emoji-count", "0", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "guidance_sweep_tiny.json").read_text())
    # scale 1 is the same for every schedule, so it runs once
    assert [(r["cfg"], r["cfg_schedule"], r["candidates"]) for r in result["seen"]] == [
        (1.0, "constant", 1), (2.0, "constant", 1), (2.0, "linear_increasing", 1)]
    assert all(r["combinations"] == "seen" for r in result["seen"])
    best = max(result["seen"], key=lambda r: r["overall"])
    assert result["chosen"] == {"cfg": best["cfg"], "cfg_schedule": best["cfg_schedule"], "candidates": 1}
    held_out = result["held_out"]
    assert held_out[0]["combinations"] == "held_out"
    assert (held_out[0]["cfg"], held_out[0]["cfg_schedule"]) == (best["cfg"], best["cfg_schedule"])
    assert "| held_out |" in (tmp_path / "guidance_sweep_tiny.md").read_text()


def test_with_emoji_the_choice_weighs_both_suites(tmp_path):
    script = load_benchmark("guidance_sweep")
    assert script.main(["--model", "tiny", "--images-per-tag", "1", "--scales", "1,2", "--schedules", "constant",
                        "--candidates", "1,2", "--steps", "1", "--size", "32", "--batch-size", "12",
                        "--emoji-count", "12", "--emoji-fit-count", "80", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "guidance_sweep_tiny.json").read_text())
    for row in result["seen"]:
        assert 0 <= row["emoji"]["R@10"] <= 1
        assert abs(row["score"] - (row["overall"] + row["emoji"]["ratio"]) / 2) < 1e-12
    assert [(r["cfg"], r["candidates"]) for r in result["seen"]] == [(1.0, 1), (1.0, 2), (2.0, 1), (2.0, 2)]
    best = max(result["seen"], key=lambda r: r["score"])
    assert result["chosen"] == {"cfg": best["cfg"], "cfg_schedule": best["cfg_schedule"],
                                "candidates": best["candidates"]}
    assert result["emoji_count"] == 12 and 0 <= result["emoji_real"]["R@10"] <= 1
    assert "emoji ratio" in (tmp_path / "guidance_sweep_tiny.md").read_text()
