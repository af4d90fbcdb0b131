"""AdamW groups, the warm-up + cosine schedule, the EMA and TrainConfig validation."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from nextstep.training import ExponentialMovingAverage, TrainConfig, WarmupCosineSchedule, build_optimizer


@given(st.integers(0, 50), st.integers(1, 200), st.floats(0, 0.5))
def test_schedule_warms_up_linearly_then_decays_to_the_minimum(warmup, extra, minimum_ratio):
    total = warmup + extra
    schedule = WarmupCosineSchedule(1e-3, warmup, total, minimum=1e-3 * minimum_ratio)
    rates = [schedule.rate(s) for s in range(total + 1)]  # a run's steps, then where it ends
    for step in range(warmup):
        assert rates[step] == pytest.approx(1e-3 * (step + 1) / warmup)
    top = max(warmup - 1, 0)
    assert rates[top] == pytest.approx(1e-3)
    assert rates[total] == pytest.approx(1e-3 * minimum_ratio)
    assert schedule.rate(total + 5) == pytest.approx(1e-3 * minimum_ratio)
    decay = rates[top:]
    assert all(a > b for a, b in zip(decay, decay[1:])), "each rate is taken once"
    assert min(rates[:total]) > 0, "no step runs at a zero rate"
    if (total - top) % 2 == 0:
        assert rates[(top + total) // 2] == pytest.approx((1e-3 + 1e-3 * minimum_ratio) / 2)


def test_optimizer_uses_the_release_settings_and_skips_frozen_and_1d_decay():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model[2].requires_grad_(False)
    optimizer = build_optimizer(model, TrainConfig())
    decayed, undecayed = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and undecayed["weight_decay"] == 0.0
    assert decayed["betas"] == (0.9, 0.95) and decayed["eps"] == 1e-8
    assert [tuple(p.shape) for p in decayed["params"]] == [(4, 4)]
    assert len(undecayed["params"]) == 3  # bias, norm weight, norm bias


def test_ema_follows_the_weights_and_restores_them_after_use():
    model = nn.Linear(3, 1)
    ema = ExponentialMovingAverage(model, decay=0.5)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(2.0)
    ema.update(model)
    torch.testing.assert_close(ema.shadow["weight"], start + 1.0)
    with ema.applied_to(model):
        torch.testing.assert_close(model.weight, start + 1.0)
    torch.testing.assert_close(model.weight, start + 2.0)


@pytest.mark.parametrize("changes, field", [
    ({"micro_batch_size": 0}, "micro_batch_size"),
    ({"precision": "fp8"}, "precision"),
    ({"parallelism": "zero3"}, "parallelism"),
    ({"loss_averaging": "tokens"}, "loss_averaging"),
    ({"min_learning_rate": 1.0}, "min_learning_rate"),
    ({"ema_decay": 1.0}, "ema_decay"),
    ({"seed": -1}, r"seed must be an integer in \[0, 2\*\*63\), found -1"),
    ({"seed": 2 ** 63}, "seed"),
    ({"seed": True}, "seed"),
])
def test_bad_settings_name_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**changes)


def test_unknown_keys_are_named():
    with pytest.raises(ValueError, match="learnig_rate"):
        TrainConfig.from_dict({"learnig_rate": 1e-3})
    assert math.isclose(TrainConfig.from_dict({"betas": [0.9, 0.99]}).betas[1], 0.99)


def test_an_ema_state_of_other_names_or_shapes_is_named():
    ema = ExponentialMovingAverage(nn.Linear(3, 2), 0.9)
    state = ema.state_dict()
    with pytest.raises(ValueError, match=r"missing \['bias'\], unexpected \['extra'\]"):
        ema.load_state_dict({"weight": state["weight"], "extra": state["bias"]})
    with pytest.raises(ValueError, match=r"EMA tensor weight has shape \(3, 2\), expected \(2, 3\)"):
        ema.check_state({"weight": state["weight"].T, "bias": state["bias"]})


def test_the_average_holds_only_the_trainable_parameters():
    """A frozen part (the image tokenizer, say) is neither averaged nor overwritten by the average."""
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    model[0].requires_grad_(False)
    ema = ExponentialMovingAverage(model, decay=0.9)
    assert sorted(ema.state_dict()) == ["1.bias", "1.weight"]
    with torch.no_grad():
        model[0].weight.add_(1.0)
    changed = model[0].weight.detach().clone()
    ema.update(model)
    with ema.applied_to(model):
        assert torch.equal(model[0].weight, changed)


def test_the_average_of_a_bf16_model_is_kept_in_float32():
    """Small moves of the weights add up in the average instead of rounding away in 16 bits."""
    model = nn.Linear(4, 4, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.fill_(0.5)
    ema = ExponentialMovingAverage(model, decay=0.99)
    assert {tensor.dtype for tensor in ema.state_dict().values()} == {torch.float32}
    with torch.no_grad():
        model.weight.fill_(1.5)
    for _ in range(3):
        ema.update(model)
    expected = 1.5 - 0.99 ** 3
    torch.testing.assert_close(ema.shadow["weight"], torch.full((4, 4), expected), rtol=0, atol=1e-6)


def test_a_state_dict_the_caller_changes_leaves_the_average_whole():
    ema = ExponentialMovingAverage(nn.Linear(3, 2), 0.9)
    state = ema.state_dict()
    state.clear()
    assert sorted(ema.state_dict()) == ["bias", "weight"]
