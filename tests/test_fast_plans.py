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


def _plan(stages, noise_steps=0, times=3):
    from nextstep.fast import SolverPlan
    return SolverPlan(tuple(stages), torch.linspace(0, 1, times), torch.ones(len(stages), 3), noise_steps)


def test_every_built_in_plan_passes_its_own_check():
    from nextstep.fast.solver_plan import PLANNED_SAMPLERS, check_plan
    for cls in PLANNED_SAMPLERS:
        sampler = cls(cls.config_class())
        for stochastic in (False, True):
            check_plan(solver_plan(sampler, sampler.make_time_grid(4), stochastic=stochastic))


@pytest.mark.parametrize("stages, noise_steps, message", [
    ([("trial_source",)], 0, "trial point before any stage writes it"),
    ([("velocity_extra",)], 0, "kept velocity before any stage keeps one"),
    ([("noise_extra", 1)], 1, "noise_index outside the plan's 1 step-noise slices"),
    ([("time", 3)], 0, "time_index outside the plan's 3 evaluation times"),
])
def test_a_plan_reading_a_scratch_buffer_before_it_is_written_is_refused(stages, noise_steps, message):
    from nextstep.fast import SolverStage
    built = []
    for kind, *value in stages:
        if kind == "trial_source":
            built.append(SolverStage(0, source="trial"))
        elif kind == "velocity_extra":
            built.append(SolverStage(0, extra="velocity", keep_velocity=True))
        elif kind == "noise_extra":
            built.append(SolverStage(0, extra="noise", noise_index=value[0]))
        else:
            built.append(SolverStage(value[0]))
    with pytest.raises(ValueError, match=message):
        _plan(built, noise_steps)


def test_a_plan_reading_what_an_earlier_stage_wrote_is_accepted():
    from nextstep.fast import SolverStage
    _plan([SolverStage(0, target="trial", keep_velocity=True),
           SolverStage(1, source="trial", extra="velocity"),
           SolverStage(2, extra="noise", noise_index=0)], noise_steps=1)


def test_a_plan_with_coefficients_of_another_stage_count_is_refused():
    from nextstep.fast import SolverPlan, SolverStage
    with pytest.raises(ValueError, match=r"\(2, 3\) coefficients, found shape \(1, 3\)"):
        SolverPlan((SolverStage(0), SolverStage(1)), torch.linspace(0, 1, 3), torch.ones(1, 3))
    with pytest.raises(ValueError, match="source and target must be"):
        _plan([SolverStage(0, target="elsewhere")])
