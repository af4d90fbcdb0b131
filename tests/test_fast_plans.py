"""Guidance as branch weights and samplers as stage tables: the fused token step's numbers."""

import pytest
import torch
from fast_helpers import draw_noise, prefill
from hypothesis import given
from hypothesis import strategies as st

from nextstep.fast import FastTokenSampler, branch_weights, solver_plan
from nextstep.fast.guidance_weights import weights_reason
from nextstep.fast.solver_plan import plan_reason
from nextstep.samplers import (
    ClassifierFreeGuidance,
    CoefficientPreservingSampler,
    EulerSampler,
    ImageEditingGuidance,
    NoGuidance,
)

SCHEDULES = st.sampled_from(["constant", "linear_increasing", "linear_decreasing"])
INTERVALS = st.tuples(st.floats(0, 1), st.floats(0, 1)).map(lambda pair: tuple(sorted(pair)))


@given(scale=st.floats(0, 10), image_scale=st.floats(0, 5), schedule=SCHEDULES, interval=INTERVALS,
       progress=st.floats(0, 1), editing=st.booleans(), seed=st.integers(0, 2**16))
def test_branch_weights_reproduce_combine(scale, image_scale, schedule, interval, progress, editing, seed):
    guidance = (ImageEditingGuidance(scale, image_scale, schedule=schedule, interval=interval) if editing
                else ClassifierFreeGuidance(scale, schedule=schedule, interval=interval))
    generator = torch.Generator().manual_seed(seed)
    times = torch.rand(5, generator=generator).sort().values
    predictions = torch.randn(guidance.num_branches, 3, 8, generator=generator)
    weights = branch_weights(guidance, times, progress)  # (E, G)
    for index, t in enumerate(times):
        expected = guidance.combine(predictions, t.expand(3), progress)
        found = torch.einsum("g,gnd->nd", weights[index], predictions)
        torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-5 * (1 + scale + image_scale))


def test_no_guidance_has_one_unit_weight():
    assert torch.equal(branch_weights(NoGuidance(), torch.zeros(4)), torch.ones(4, 1))


def test_unsupported_components_are_named():
    assert "renorm" in weights_reason(ClassifierFreeGuidance(3.0, renorm=1.5))

    class CustomGuidance(ClassifierFreeGuidance):
        pass

    assert "CustomGuidance has no branch weights" in weights_reason(CustomGuidance(2.0))
    assert "CoefficientPreservingSampler has no fused plan" in plan_reason(CoefficientPreservingSampler())
    with pytest.raises(ValueError, match="has no fused plan"):
        solver_plan(CoefficientPreservingSampler(), torch.linspace(0, 1, 3))


def test_euler_plan_is_one_stage_per_interval():
    grid = EulerSampler().make_time_grid(4, 3.0)
    plan = solver_plan(EulerSampler(), grid)
    assert [stage.time_index for stage in plan.stages] == [0, 1, 2, 3]
    torch.testing.assert_close(plan.coefficients[:, 1], grid.diff())
    assert plan.coefficients[:, 0].eq(1).all() and plan.coefficients[:, 2].eq(0).all()


@pytest.mark.parametrize("guidance", [
    ImageEditingGuidance(3.0, 1.5, schedule="linear_decreasing", interval=(0.1, 0.9)),
    ClassifierFreeGuidance(2.5, schedule="linear", renorm=1.2),
], ids=["editing", "renorm"])
def test_fused_and_generic_paths_agree(trained_like_model, guidance):
    """The same guidance through the fused step and through the components' own code."""
    class Generic(type(guidance)):
        """A subclass: not one of the weighted types, so it runs through the generic path."""

    generic = Generic.__new__(Generic)
    generic.__dict__.update(vars(guidance))
    model = trained_like_model.eval()
    results = []
    for chosen in (guidance, generic):
        fast = FastTokenSampler(model, use_kernels=False)
        hidden, cache, next_positions = prefill(model, ["a", "bb"], (2, 2), chosen.num_branches, fast.new_cache)
        noise, _ = draw_noise(2, 7, 4, model.token_dim, 3, False)
        results.append(fast.sample_tokens(hidden, cache, next_positions, noise, guidance=chosen,
                                          sampler=EulerSampler(), num_steps=3))
    assert FastTokenSampler(model).fused_reason(EulerSampler(), generic) is not None
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-4)


def test_the_first_adams_bashforth_stage_reads_no_kept_velocity():
    from nextstep.fast import solver_plan
    from nextstep.samplers import AdamsBashforthSampler

    sampler = AdamsBashforthSampler()
    plan = solver_plan(sampler, sampler.make_time_grid(4, 1.0))
    assert plan.stages[0].extra is None and all(stage.extra == "velocity" for stage in plan.stages[1:])
