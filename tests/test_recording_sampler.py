"""RecordingSampler: the wrapped sampler's tokens, unchanged, and every velocity call it made."""

from __future__ import annotations

import pytest
import torch

from nextstep import build_model
from nextstep.registry import component_class, component_names
from nextstep.samplers import EulerSampler, RecordingSampler, time_grid
from nextstep.testing import check_sampler, randomize


@pytest.fixture(scope="module")
def model():
    model = build_model("tiny", seed=0)
    randomize(model.image_head, generator=torch.Generator().manual_seed(0))  # a velocity that is not 0
    return model


@pytest.mark.parametrize("name", component_names("sampler"))
def test_generation_through_the_recorder_gives_the_sampler_s_own_tokens(model, name):
    cls = component_class("sampler", name)
    sampler = cls(cls.config_class())
    recorder = RecordingSampler(sampler)
    options = dict(height=32, width=48, num_steps=3, seed=5, cfg=2.0, num_images_per_prompt=2, return_tokens=True)
    alone = model.generate(["a red circle"], sampler=sampler, **options)[1]
    recorded = model.generate(["a red circle"], sampler=recorder, **options)[1]
    assert torch.equal(alone, recorded)
    assert len(recorder.records) == 2 * 3  # one per token of the 2x3 grid
    for index, record in enumerate(recorder.records):
        assert torch.equal(record.sample, alone[:, index])
        assert record.noise.shape == (2, model.token_dim) and record.time_grid.shape[0] >= 2
        assert len(record.calls) == (record.time_grid.shape[0] - 1) * sampler.evaluations_per_step
        promised = sampler.evaluation_times(record.time_grid)
        if promised is not None:
            assert {float(t) for call in record.calls for t in call.t} <= set(promised.tolist())
    recorder.clear()
    assert recorder.records == []


def test_each_call_keeps_the_state_and_the_velocity_it_returned():
    recorder = RecordingSampler(EulerSampler())
    noise = torch.randn(3, 4)
    out = recorder.sample(lambda x, t: 2 * x + t[:, None], noise, time_grid(4))
    (record,) = recorder.records
    assert [call.t[0].item() for call in record.calls] == time_grid(4)[:-1].tolist()
    x = noise
    for call, (t, following) in zip(record.calls, zip(time_grid(4)[:-1], time_grid(4)[1:])):
        torch.testing.assert_close(call.x, x)
        torch.testing.assert_close(call.v, 2 * x + t)
        x = x + (following - t) * call.v
    torch.testing.assert_close(record.sample, out)
    torch.testing.assert_close(out, x)
    check_sampler(RecordingSampler(EulerSampler()))


def test_the_recorder_takes_a_sampler_only():
    with pytest.raises(ValueError, match="RecordingSampler records a Sampler, found str"):
        RecordingSampler("euler")
