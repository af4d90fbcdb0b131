"""Token statistics under guidance: the per-position statistics, their groups, and the report on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nextstep.evaluation.sampling import SamplingSettings
from nextstep.evaluation.token_statistics import (
    OUTLIER_THRESHOLD,
    PositionStatistics,
    guidance_token_statistics,
    position_groups,
)


@settings(deadline=None, max_examples=40)
@given(st.integers(1, 6), st.integers(1, 5), st.integers(2, 9), st.integers(1, 5), st.integers(0, 2**31))
def test_statistics_of_batches_combine_into_those_of_all_images(images, positions, features, cut, seed):
    tokens = torch.randn(images + cut, positions, features, generator=torch.Generator().manual_seed(seed)) * 3
    whole = PositionStatistics.of(tokens)
    expected_std = torch.stack([tokens[i].double().std(dim=1, unbiased=False) for i in range(len(tokens))]).mean(0)
    torch.testing.assert_close(whole.std, expected_std)
    torch.testing.assert_close(whole.mean, tokens.double().mean(dim=2).mean(dim=0))
    torch.testing.assert_close(whole.outliers, (tokens.abs() > OUTLIER_THRESHOLD).double().mean(dim=(0, 2)))
    parts = PositionStatistics.combined([PositionStatistics.of(tokens[:cut]), PositionStatistics.of(tokens[cut:])])
    assert parts.images == whole.images == images + cut
    for name in ("mean", "std", "outliers"):
        torch.testing.assert_close(getattr(parts, name), getattr(whole, name))


@given(st.integers(1, 300), st.integers(1, 12))
def test_position_groups_cut_the_positions_into_near_equal_consecutive_runs(tokens, parts):
    groups = position_groups(tokens, parts)
    assert len(groups) == min(parts, tokens)
    assert [i for group in groups for i in group] == list(range(tokens))
    sizes = [len(group) for group in groups]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_statistics_refuse_tokens_of_another_shape():
    with pytest.raises(ValueError, match=r"tokens must have shape \(B, N, D\) with B, N >= 1 and D >= 2, found "
                                         r"\(4, 16\)"):
        PositionStatistics.of(torch.zeros(4, 16))
    with pytest.raises(ValueError, match="at least one batch"):
        PositionStatistics.combined([])


@pytest.fixture(scope="module")
def scenes():
    from nextstep.training.data.shapes.world import ShapesConfig, ShapesDataset

    dataset = ShapesDataset(ShapesConfig(num_samples=3, size=32, split="test"))
    return [dataset.load(i) for i in range(3)]


def test_the_report_compares_each_scale_with_the_real_tokens_by_position(tmp_path, scenes):
    from nextstep import build_model

    model = build_model("tiny", seed=0)
    with torch.no_grad():  # the head's zero-initialised outputs would make every scale sample the noise as it is
        for parameter in model.image_head.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    sampling = SamplingSettings(height=32, width=32, num_steps=2, batch_size=2)
    calls = []
    report = guidance_token_statistics(model, [s.caption for s in scenes], [s.image for s in scenes],
                                       scales=[1, 4, 1], settings=sampling, parts=3, output=tmp_path,
                                       progress=lambda done, total: calls.append((done, total)))
    assert report.grid == (2, 2) and report.real.images == 3 and report.use_norm is model.config.use_norm
    assert [scale for scale, _ in report.generated] == [1.0, 4.0, 1.0]
    assert all(statistics.images == 3 and statistics.std.shape == (4,) for _, statistics in report.generated)
    # The same seeds at every scale: the same scale twice gives the same tokens.
    assert torch.equal(report.generated[0][1].std, report.generated[2][1].std)
    assert not torch.equal(report.generated[0][1].std, report.generated[1][1].std)
    assert calls == [(2, 9), (3, 9), (5, 9), (6, 9), (8, 9), (9, 9)]
    gaps = report.gaps(1)
    assert len(gaps["std"]) == 3 and gaps["std"][0] == pytest.approx(
        float((report.generated[1][1].std[:2] - report.real.std[:2]).mean()))
    assert gaps["mean"][2] == pytest.approx(float((report.generated[1][1].mean[3] - report.real.mean[3]).abs()))
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["grid"] == [2, 2] and saved["settings"]["num_steps"] == 2 and "cfg" not in saved["settings"]
    assert [row["cfg"] for row in saved["generated"]] == [1.0, 4.0, 1.0]
    markdown = (tmp_path / "report.md").read_text()
    assert "| token spread (std) | tokens 1-2 | token 3 | token 4 |" in markdown
    assert "| CFG 4 |" in markdown and markdown.count("| real |") == 3
    lines = (tmp_path / "positions.csv").read_text().splitlines()
    assert lines[0].startswith("position,real_mean,real_std,real_outliers,cfg1_mean") and len(lines) == 5
    assert float(lines[1].split(",")[2]) == pytest.approx(float(report.real.std[0]), rel=1e-5)


def test_bad_requests_are_refused_before_anything_is_sampled(monkeypatch, scenes):
    import nextstep.evaluation.token_statistics as token_statistics

    def refuse(*args, **kwargs):
        raise AssertionError("sampled")

    monkeypatch.setattr(token_statistics, "sample_token_batches", refuse)
    monkeypatch.setattr(token_statistics, "real_token_statistics", refuse)
    prompts, images = [s.caption for s in scenes], [s.image for s in scenes]
    sampling = SamplingSettings(height=32, width=32)
    for kwargs, message in (
            ({"prompts": []}, "expected at least one prompt, found none"),
            ({"scales": []}, r"scales must be one or more finite numbers >= 0, found \[\]"),
            ({"scales": [1, float("nan")]}, r"found \[1.0, nan\]"),
            ({"scales": [-1]}, r"found \[-1.0\]"),
            ({"settings": SamplingSettings(height=64, width=64)}, "real images must be 64x64 like the generated "
                                                                  "ones, found 32x32")):
        arguments = {"prompts": prompts, "real_images": images, "scales": [1, 2], "settings": sampling, **kwargs}
        with pytest.raises(ValueError, match=message):
            guidance_token_statistics(None, **arguments)
