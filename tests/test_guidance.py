"""Guidance objects: formulas, reductions, schedules by direction, intervals, renormalisation."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nextstep.heads import FlowMatchingHead, FlowMatchingHeadConfig
from nextstep.samplers import (
    GUIDANCE_SCHEDULES,
    ClassifierFreeGuidance,
    GuidedVelocity,
    ImageEditingGuidance,
    NoGuidance,
    guidance_for_scale,
    scheduled_scale,
)
from nextstep.samplers.guidance_schedule import token_progress

scales = st.floats(0.0, 20.0)


def predictions(branches, seed=0, rows=5, dim=8):
    return torch.randn(branches, rows, dim, generator=torch.Generator().manual_seed(seed))


@given(st.integers(0, 1000))
def test_cfg_at_scale_one_is_the_conditional_prediction(seed):
    v = predictions(2, seed)
    assert torch.equal(ClassifierFreeGuidance(1.0).combine(v), v[0])
    assert torch.equal(NoGuidance().combine(v[:1]), v[0])


@given(scales, st.integers(0, 1000))
def test_cfg_formula(scale, seed):
    v = predictions(2, seed)
    expected = v[1] + scale * (v[0] - v[1])
    torch.testing.assert_close(ClassifierFreeGuidance(scale).combine(v), expected, atol=1e-4, rtol=1e-5)


@given(scales, scales, st.integers(0, 1000))
def test_editing_guidance_formula(scale, image_scale, seed):
    v = predictions(3, seed)
    expected = v[2] + image_scale * (v[1] - v[2]) + scale * (v[0] - v[1])
    out = ImageEditingGuidance(scale, image_scale).combine(v)
    torch.testing.assert_close(out, expected, atol=1e-3, rtol=1e-5)


@given(scales, st.integers(0, 1000))
def test_three_way_reduces_to_two_way_at_image_scale_one(scale, seed):
    v = predictions(3, seed)
    three = ImageEditingGuidance(scale, 1.0).combine(v)
    two = ClassifierFreeGuidance(scale).combine(v[:2])
    torch.testing.assert_close(three, two, atol=1e-4, rtol=1e-5)


def test_guidance_for_scale_picks_the_cheapest_object():
    assert isinstance(guidance_for_scale(1.0), NoGuidance)
    assert isinstance(guidance_for_scale(7.5), ClassifierFreeGuidance)
    assert isinstance(guidance_for_scale(1.0, image_scale=1.0), NoGuidance)
    assert guidance_for_scale(7.5, image_scale=1.0).num_branches == 2
    editing = guidance_for_scale(7.5, image_scale=2.0, schedule="linear")
    assert isinstance(editing, ImageEditingGuidance) and editing.schedule == "linear_decreasing"
    for bad in (dict(scale=-1.0), dict(scale=float("nan")), dict(scale=float("inf")),
                dict(scale=2.0, image_scale=-2.0)):
        with pytest.raises(ValueError, match="must be a finite number >= 0"):
            guidance_for_scale(bad.pop("scale"), **bad)


def test_schedules_are_named_by_direction():
    count = 10
    first, last = token_progress(0, count), token_progress(count - 1, count)
    assert (first, last) == (0.0, 0.9) and token_progress(0, 1) == 0.0
    assert scheduled_scale(7.5, "constant", first) == scheduled_scale(7.5, "constant", last) == 7.5
    assert scheduled_scale(7.5, "linear_increasing", first) == 1.0
    assert scheduled_scale(7.5, "linear_increasing", last) == pytest.approx(1 + 6.5 * 0.9)
    assert scheduled_scale(7.5, "linear_decreasing", first) == 7.5
    assert scheduled_scale(7.5, "linear_decreasing", last) == pytest.approx(1 + 6.5 / count)
    for p in (0.0, 0.3, 0.9):  # the release's "linear" decreases
        assert scheduled_scale(7.5, "linear", p) == scheduled_scale(7.5, "linear_decreasing", p)
    increasing = [scheduled_scale(4.0, "linear_increasing", token_progress(i, count)) for i in range(count)]
    assert increasing == sorted(increasing)
    assert set(GUIDANCE_SCHEDULES) == {"constant", "linear_increasing", "linear_decreasing"}


@given(count=st.integers(1, 4096), scale=st.floats(1.0, 20.0))
def test_linear_is_the_release_schedule_token_for_token(count, scale):
    """The release's "linear" at the token with ``i`` tokens before it: ``1 + (s - 1) * (L - i) / L``."""
    for index in {0, count // 2, count - 1}:
        release = 1 + (scale - 1) * (count - index) / count
        assert scheduled_scale(scale, "linear", token_progress(index, count)) == pytest.approx(release, rel=1e-12)


def test_schedule_reaches_combine_through_progress():
    v = predictions(2)
    guidance = ClassifierFreeGuidance(5.0, schedule="linear_decreasing")
    torch.testing.assert_close(guidance.combine(v, progress=1.0), v[0])
    torch.testing.assert_close(guidance.combine(v, progress=0.0), ClassifierFreeGuidance(5.0).combine(v))


def test_unknown_schedule_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"known: \['constant', 'linear_increasing', 'linear_decreasing', "
                                         r"'linear \(= linear_decreasing\)'\]"):
        ClassifierFreeGuidance(3.0, schedule="cosine")


def test_interval_guides_only_inside_it():
    v = predictions(2)
    guidance = ClassifierFreeGuidance(4.0, interval=(0.2, 0.6))
    plain = ClassifierFreeGuidance(4.0).combine(v)
    t = torch.tensor([0.0, 0.2, 0.4, 0.6, 0.9])
    out = guidance.combine(v, t)
    inside = torch.tensor([False, True, True, True, False])
    torch.testing.assert_close(out[inside], plain[inside])
    torch.testing.assert_close(out[~inside], v[0][~inside])
    torch.testing.assert_close(guidance.combine(v), plain)  # no time: no interval
    editing = ImageEditingGuidance(4.0, 2.0, interval=(0.5, 1.0)).combine(predictions(3), t)
    torch.testing.assert_close(editing[:2], predictions(3)[0][:2])
    for bad in ((0.5, 0.2), (-0.1, 0.5), (0.0, 1.5), "x"):
        with pytest.raises(ValueError, match="interval"):
            ClassifierFreeGuidance(4.0, interval=bad)


def test_renorm_caps_the_guided_norm():
    v = predictions(2)
    guided = ClassifierFreeGuidance(6.0).combine(v)
    capped = ClassifierFreeGuidance(6.0, renorm=1.0).combine(v)
    norm, limit = capped.norm(dim=-1), v[0].norm(dim=-1)
    assert torch.all(norm <= limit * (1 + 1e-5))
    # Direction kept; rows already under the cap are untouched.
    cosine = torch.nn.functional.cosine_similarity(capped, guided, dim=-1)
    torch.testing.assert_close(cosine, torch.ones_like(cosine))
    loose = ClassifierFreeGuidance(6.0, renorm=1e6).combine(v)
    torch.testing.assert_close(loose, guided)
    with pytest.raises(ValueError, match="renorm"):
        ClassifierFreeGuidance(6.0, renorm=0.0)


def small_head():
    torch.manual_seed(0)
    head = FlowMatchingHead(FlowMatchingHeadConfig(token_dim=8, condition_dim=16, width=32, depth=2))
    with torch.no_grad():
        for parameter in head.parameters():
            if parameter.abs().sum() == 0:
                parameter.normal_(std=0.1)
    return head


def test_guided_velocity_at_scale_one_is_the_conditional_path():
    head = small_head()
    conditions = torch.randn(2, 4, 16)
    x, t = torch.randn(4, 8), torch.full((4,), 0.3)
    with torch.no_grad():
        guided = GuidedVelocity(head, conditions, ClassifierFreeGuidance(1.0))(x, t)
        single = GuidedVelocity(head, conditions[:1], NoGuidance())(x, t)
        direct = head.velocity(x, t, conditions[0])
    torch.testing.assert_close(guided, direct, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(single, direct, atol=1e-5, rtol=1e-5)


def test_guided_velocity_checks_the_branch_count():
    head = small_head()
    for conditions in (torch.randn(3, 4, head.condition_dim), torch.randn(2, 2, 2, head.condition_dim),
                       torch.randn(2, 4, head.condition_dim + 1)):
        shape = str(tuple(conditions.shape)).replace("(", r"\(").replace(")", r"\)")
        with pytest.raises(ValueError, match=rf"guidance needs conditions of shape \(2, N, {head.condition_dim}\), "
                                             rf"found {shape}"):
            GuidedVelocity(head, conditions, ClassifierFreeGuidance(2.0))


@pytest.mark.parametrize("guidance", [NoGuidance(), ClassifierFreeGuidance(2.0)])
def test_guided_velocity_names_a_time_that_is_not_one_per_row(guidance):
    conditions = torch.randn(guidance.num_branches, 4, 16)
    velocity = GuidedVelocity(small_head(), conditions, guidance)
    with pytest.raises(ValueError, match=r"t must have shape \(4,\), one time per row of x_t, found \(\)"):
        velocity(torch.randn(4, 8), torch.tensor(0.3))


def test_guided_velocity_passes_time_and_progress_to_custom_guidance():
    seen = {}

    class Recording(ClassifierFreeGuidance):
        def combine(self, predictions, t=None, progress=0.0):
            seen["t"], seen["progress"], seen["shape"] = t, progress, tuple(predictions.shape)
            return super().combine(predictions, t, progress)

    velocity = GuidedVelocity(small_head(), torch.randn(2, 3, 16), Recording(2.0), progress=0.25)
    with torch.no_grad():
        velocity(torch.randn(3, 8), torch.full((3,), 0.5))
    assert seen["shape"] == (2, 3, 8) and seen["progress"] == 0.25
    torch.testing.assert_close(seen["t"], torch.full((3,), 0.5))


@pytest.mark.parametrize("guidance, shape", [
    (ClassifierFreeGuidance(3.0), (3, 4, 8)),
    (ClassifierFreeGuidance(3.0), (4, 8)),
    (ImageEditingGuidance(3.0, 1.5), (2, 4, 8)),
    (NoGuidance(), (2, 4, 8)),
])
def test_guidance_refuses_predictions_of_another_number_of_branches(guidance, shape):
    with pytest.raises(ValueError, match=rf"{type(guidance).__name__} combines predictions of shape "
                                         rf"\({guidance.num_branches}, N, D\), one per branch, found "
                                         rf"\({', '.join(map(str, shape))},?\)"):
        guidance.combine(torch.randn(shape))


def test_scheduled_scale_refuses_an_unknown_schedule():
    """``scheduled_scale`` takes only the known names and their aliases; anything else raises."""
    assert scheduled_scale(3.0, "linear", 0.5) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="unknown guidance schedule 'cosine'"):
        scheduled_scale(3.0, "cosine", 0.5)


def test_guided_velocity_gives_each_branch_the_time_of_its_own_row():
    """Rows at different times: every branch of row i is evaluated at t[i], then combined with CFG."""
    head = small_head()
    conditions = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(1))  # (G, N, C)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))  # (N, D)
    t = torch.tensor([0.1, 0.35, 0.6, 0.9])  # (N,)
    with torch.no_grad():
        guided = GuidedVelocity(head, conditions, ClassifierFreeGuidance(3.0))(x, t)
        conditional, unconditional = head.velocity(x, t, conditions[0]), head.velocity(x, t, conditions[1])
    torch.testing.assert_close(guided, unconditional + 3.0 * (conditional - unconditional), atol=1e-5, rtol=1e-5)


def test_guided_velocity_returns_the_dtype_of_x_t():
    """The head runs in the conditions' dtype; the guided velocity comes back in the dtype of ``x_t``."""
    head = small_head()
    conditions = torch.randn(2, 3, 16)  # (G, N, C) float32
    x, t = torch.randn(3, 8, dtype=torch.float64), torch.full((3,), 0.4, dtype=torch.float64)
    with torch.no_grad():
        out = GuidedVelocity(head, conditions, ClassifierFreeGuidance(2.0))(x, t)
        reference = GuidedVelocity(head, conditions, ClassifierFreeGuidance(2.0))(x.float(), t.float())
    assert out.dtype == torch.float64 and out.shape == (3, 8)
    torch.testing.assert_close(out, reference.double())
