"""Choosing text tokens from logits: greedy, temperature, top-k, top-p, banned classes."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nextstep.text_sampling import choose_tokens, kept_log_weights

rows_and_classes = st.tuples(st.integers(1, 4), st.integers(2, 40))


def draw_logits(rows, classes, seed):
    return torch.randn(rows, classes, generator=torch.Generator().manual_seed(seed)) * 3


@given(shape=rows_and_classes, seed=st.integers(0, 2**16), banned_share=st.floats(0, 0.8))
def test_temperature_zero_takes_the_largest_allowed_logit(shape, seed, banned_share):
    logits = draw_logits(*shape, seed)
    banned = torch.rand(shape[1], generator=torch.Generator().manual_seed(seed + 1)) < banned_share
    banned[0] = False
    chosen = choose_tokens(logits, torch.rand(shape[0]), temperature=0, banned=banned)
    expected = logits.masked_fill(banned, float("-inf")).argmax(-1)
    assert torch.equal(chosen, expected)


@given(shape=rows_and_classes, seed=st.integers(0, 2**16), temperature=st.floats(0.1, 3),
       top_k=st.none() | st.integers(1, 50), top_p=st.none() | st.floats(0.05, 1.0),
       banned_share=st.floats(0, 0.8), uniform=st.floats(0, 0.9999999))
def test_a_draw_is_always_a_kept_class(shape, seed, temperature, top_k, top_p, banned_share, uniform):
    logits = draw_logits(*shape, seed)
    banned = torch.rand(shape[1], generator=torch.Generator().manual_seed(seed + 1)) < banned_share
    banned[seed % shape[1]] = False
    weights = kept_log_weights(logits, temperature=temperature, top_k=top_k, top_p=top_p, banned=banned)
    chosen = choose_tokens(logits, torch.full((shape[0],), uniform), temperature=temperature, top_k=top_k,
                           top_p=top_p, banned=banned)
    assert torch.isfinite(weights.gather(-1, chosen[:, None])).all()
    assert not banned[chosen].any()
    allowed = int((~banned).sum())
    kept = torch.isfinite(weights).sum(-1)
    if top_k is not None:
        assert (kept <= min(top_k, allowed)).all()
        if top_p is None:
            assert (kept == min(top_k, allowed)).all()
    assert (kept >= 1).all()


@given(shape=rows_and_classes, seed=st.integers(0, 2**16), top_p=st.floats(0.05, 0.999))
def test_top_p_keeps_the_smallest_most_probable_set_reaching_p(shape, seed, top_p):
    logits = draw_logits(*shape, seed)
    weights = kept_log_weights(logits, top_p=top_p)
    probabilities = logits.softmax(-1)
    for row in range(shape[0]):
        kept = torch.isfinite(weights[row])
        mass = float(probabilities[row][kept].sum())
        assert mass >= top_p - 1e-6
        # Dropping the least probable kept class would fall short of p.
        assert mass - float(probabilities[row][kept].min()) < top_p + 1e-6
        # Every kept class is at least as probable as every dropped one.
        if (~kept).any():
            assert probabilities[row][kept].min() >= probabilities[row][~kept].max()


@given(classes=st.integers(2, 12), seed=st.integers(0, 2**16), temperature=st.floats(0.3, 2.0),
       top_k=st.none() | st.integers(1, 12))
def test_draws_over_evenly_spread_uniforms_reproduce_the_kept_distribution(classes, seed, temperature, top_k):
    count = 4000
    logits = draw_logits(1, classes, seed).expand(count, classes)
    uniforms = (torch.arange(count, dtype=torch.float64) + 0.5) / count
    chosen = choose_tokens(logits, uniforms, temperature=temperature, top_k=top_k)
    frequencies = torch.bincount(chosen, minlength=classes).double() / count
    expected = kept_log_weights(logits[:1], temperature=temperature, top_k=top_k).double().softmax(-1)[0]
    torch.testing.assert_close(frequencies, expected, atol=1.5 / count, rtol=0)


def test_rows_choose_independently_of_each_other():
    logits = draw_logits(5, 30, 3)
    uniforms = torch.rand(5, generator=torch.Generator().manual_seed(4))
    together = choose_tokens(logits, uniforms, temperature=0.8, top_k=10, top_p=0.9)
    alone = torch.cat([choose_tokens(logits[r:r + 1], uniforms[r:r + 1], temperature=0.8, top_k=10, top_p=0.9)
                       for r in range(5)])
    assert torch.equal(together, alone)


@pytest.mark.parametrize("settings, message", [
    (dict(temperature=-1.0), "temperature must be a finite number >= 0"),
    (dict(temperature=float("inf")), "temperature must be a finite number >= 0"),
    (dict(top_k=0), "top_k must be an integer >= 1"),
    (dict(top_p=0.0), r"top_p must be a number in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be a number in \(0, 1\]"),
    (dict(temperature=0.0, top_k=5), r"need temperature > 0; found temperature 0 \(greedy choice\) with top_k=5"),
    (dict(temperature=0, top_p=0.9), r"need temperature > 0; found temperature 0 .*top_p=0.9"),
])
def test_settings_out_of_range_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        choose_tokens(torch.zeros(1, 4), torch.zeros(1), **settings)


def test_a_tiny_temperature_is_greedy_however_large_the_logits():
    """Logits over a tiny temperature overflow unless measured from the row's largest; a banned class
    would then make inf - inf."""
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.5], [-1.0, 4.0, 4.0, 0.0]])
    banned = torch.tensor([False, False, False, True])
    for uniform in (0.0, 0.5, 0.99):
        chosen = choose_tokens(logits, torch.full((2,), uniform), temperature=1e-39, banned=banned)
        assert chosen[0] == 0 and chosen[1] in (1, 2)


def test_shapes_and_an_all_banned_vocabulary_are_refused():
    with pytest.raises(ValueError, match=r"one uniform per row, shape \(2,\), found \(3,\)"):
        choose_tokens(torch.zeros(2, 4), torch.zeros(3))
    with pytest.raises(ValueError, match="every class is banned"):
        choose_tokens(torch.zeros(1, 4), torch.zeros(1), banned=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"banned must have shape \(4,\), found \(5,\)"):
        kept_log_weights(torch.zeros(1, 4), banned=torch.zeros(5, dtype=torch.bool))


def test_top_p_keeps_the_smallest_set_that_reaches_p_exactly():
    from nextstep.text_sampling import kept_log_weights

    weights = kept_log_weights(torch.zeros(1, 4), top_p=0.5)  # 0.25 each: two classes make 0.5
    assert int(torch.isfinite(weights).sum()) == 2


def test_a_draw_at_the_total_takes_the_last_kept_class():
    from nextstep.text_sampling import choose_tokens

    logits = torch.tensor([[1.0, 2.0, 0.5, 3.0]])
    banned = torch.tensor([False, False, False, True])
    assert choose_tokens(logits, torch.tensor([1.0]), banned=banned).tolist() == [2]


@pytest.mark.parametrize(("options", "message"), [(dict(top_k=0), "top_k"), (dict(top_p=0.0), "top_p"),
                                                  (dict(top_p=-1.0), "top_p")])
def test_the_kept_weights_refuse_filters_that_would_keep_nothing(options, message):
    with pytest.raises(ValueError, match=message):
        kept_log_weights(torch.tensor([[1.0, 2.0, 3.0]]), **options)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logits_holding_nan_are_refused_rather_than_read_as_a_token(temperature):
    logits = torch.tensor([[1.0, 2.0], [float("nan"), 0.0]])
    with pytest.raises(FloatingPointError, match=r"the LM head's logits hold NaN \(rows \[1\]\)"):
        choose_tokens(logits, temperature=temperature, uniforms=torch.rand(2))
