"""benchmarks/distilled_head.py distils a student per step count and objective and scores it beside its
teacher."""

import json

from benchmark_helpers import load_benchmark


def test_the_script_scores_the_teacher_and_each_student_and_saves_them(tmp_path, monkeypatch):
    import nextstep.training.prompt_sets as prompt_sets
    from nextstep import build_model, load_model

    asked = []
    monkeypatch.setattr(prompt_sets, "prompt_set", lambda name: asked.append(name) or ["a red circle", "a square"])
    build_model("tiny", seed=0).save_pretrained(tmp_path / "tiny")
    script = load_benchmark("distilled_head")
    assert script.main(["--model", str(tmp_path / "tiny"), "--steps", "2,1", "--teacher-steps", "4",
                        "--shapes-repeats", "2", "--emoji-repeats", "1", "--iterations", "3", "--images-per-tag", "1",
                        "--emoji-limit", "0", "--size", "32", "--batch-size", "6", "--save", str(tmp_path / "saved"),
                        "--latency-rounds", "2", "--output", str(tmp_path / "result.json")]) == 0
    assert asked == ["shapes-seen", "emoji-train"]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["prompts"] == 6 and result["latency_rounds"] == 2
    rows = [(row["model"], row["cfg"], row["num_steps"], row["head_evaluations_per_token"]) for row in result["rows"]]
    assert rows == [("teacher", 7.5, 50, 100), ("teacher", 7.5, 2, 4), ("student", 1.0, 2, 2), ("student", 1.0, 2, 2),
                    ("teacher", 7.5, 1, 2), ("student", 1.0, 1, 1), ("student", 1.0, 1, 1)]
    assert [row.get("objective") for row in result["rows"]] == [None, None, "segments", "rollout",
                                                                None, "segments", "rollout"]
    for row in result["rows"]:
        assert 0 <= row["shapes"] <= 1 and row["seconds_per_image_batch1"] > 0 and row["seconds_per_image_batch8"] > 0
        low, median, high = row["seconds_per_image_batch8_quartiles"]
        assert low <= median <= high and abs(median - row["seconds_per_image_batch8"]) < 1e-12
    segments, rollout = result["rows"][2]["distillation"], result["rows"][3]["distillation"]
    assert segments["tokens"] == rollout["tokens"] == 24  # 6 images of 2x2 tokens, recorded once for both
    assert segments["seconds"]["teacher"] == rollout["seconds"]["teacher"] > 0
    for steps, objective in ((2, "segments"), (1, "rollout")):
        student = load_model(str(tmp_path / "saved" / f"tiny-{steps}-steps-{objective}"))
        assert (student.config.generation.num_steps, student.config.generation.height) == (steps, 32)
    assert "| student | rollout | 1 | 2 | 2 |" in (tmp_path / "result.md").read_text()


def test_the_held_out_emoji_are_prepared_once_and_score_every_row(tmp_path, monkeypatch):
    import nextstep.evaluation.emoji_eval as emoji_eval
    import nextstep.training.prompt_sets as prompt_sets
    from nextstep import build_model

    prepared, scored = [], []

    class CountingSuite:
        def __init__(self, size, limit):
            prepared.append((size, limit))

        def __call__(self, model, settings):
            scored.append((settings.cfg, settings.num_steps))
            return emoji_eval.EmojiReport(
                count=10, frechet_generated=3.0, frechet_real=2.0, frechet_ratio=1.5, retrieval_real={"R@10": 0.5},
                retrieval_generated={"R@10": 0.25}, retrieval_ratio=0.5, frechet_reconstructed=1.0,
                retrieval_reconstructed={"R@10": 0.5}, ridge_alpha=10.0)

    monkeypatch.setattr(emoji_eval, "HeldOutEmoji", CountingSuite)
    monkeypatch.setattr(prompt_sets, "prompt_set", lambda name: ["a red circle"])
    build_model("tiny", seed=0).save_pretrained(tmp_path / "tiny")
    script = load_benchmark("distilled_head")
    assert script.main(["--model", str(tmp_path / "tiny"), "--steps", "1", "--teacher-steps", "2",
                        "--objectives", "segments", "--shapes-repeats", "10", "--emoji-repeats", "0",
                        "--iterations", "2", "--images-per-tag", "1", "--emoji-limit", "12", "--size", "32",
                        "--latency-rounds", "1", "--output", str(tmp_path / "result.json")]) == 0
    assert prepared == [(32, 12)]
    assert scored == [(7.5, 50), (7.5, 1), (1.0, 1)]
    result = json.loads((tmp_path / "result.json").read_text())
    assert [(row["emoji_r10_ratio"], row["emoji_frechet_ratio"], row["emoji_count"]) for row in result["rows"]] == [
        (0.5, 1.5, 10)] * 3
    assert "| student | segments | 1 | 1 | 1 |" in (tmp_path / "result.md").read_text()
