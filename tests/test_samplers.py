"""Samplers against closed forms: the exact velocity field of Gaussian data.

Data x1 ~ N(mu, s^2) per dimension and noise x0 ~ N(0, 1) give
``x_t ~ N(t mu, var(t))`` with ``var(t) = t^2 s^2 + (1 - t)^2`` and the exact velocity
``v(x, t) = mu + (t s^2 - (1 - t)) / var(t) * (x - t mu)``. Its ODE maps a starting
point x0 to ``mu + s * x0`` at t=1, so every solver's error is known exactly.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nextstep.registry import component_class, component_names
from nextstep.samplers import (
    CoefficientPreservingSampler,
    CoefficientPreservingSamplerConfig,
    ConstantSteps,
    EulerMaruyamaSampler,
    EulerMaruyamaSamplerConfig,
    FlowSDESampler,
    FlowSDESamplerConfig,
    LinearSteps,
    shift_time,
    time_grid,
    truncated_time_grid,
)
from nextstep.samplers.step_schedule import as_step_schedule

MU, STD = 1.5, 0.5
ODE_SOLVERS = ["euler", "heun", "midpoint", "adams_bashforth"]
SDE_SOLVERS = ["euler_maruyama", "flow_sde", "cps"]


def gaussian_velocity(mu=MU, std=STD):
    def velocity(x, t):
        t = t.to(x.dtype)[:, None]
        variance = t**2 * std**2 + (1 - t) ** 2
        return mu + (t * std**2 - (1 - t)) / variance * (x - t * mu)

    return velocity


def float64_draws(seed, *, rows, dim, steps):
    """Starting noise (rows, dim) and step noise (steps, rows, dim) in float64, from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(rows, dim, generator=generator, dtype=torch.float64)
    return noise, torch.randn(steps, rows, dim, generator=generator, dtype=torch.float64)


def make(name, **fields):
    cls = component_class("sampler", name)
    return cls(cls.config_class(**fields))


def test_every_builtin_sampler_is_registered():
    assert set(ODE_SOLVERS + SDE_SOLVERS) <= set(component_names("sampler"))


@pytest.mark.parametrize("name", ODE_SOLVERS)
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_ode_solvers_map_noise_to_the_exact_gaussian_sample(name, shift):
    noise = torch.randn(512, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sampler = make(name)
    out = sampler.sample(gaussian_velocity(), noise, time_grid(64, shift, dtype=torch.float64))
    tolerance = 0.1 if sampler.order == 1 else 2e-3
    torch.testing.assert_close(out, MU + STD * noise, atol=tolerance, rtol=0)
    assert abs(out.mean().item() - MU) < 0.05
    assert abs(out.std().item() - STD) < 0.03


def measured_order(sampler, velocity, noise, exact, steps=(8, 16, 32, 64)):
    """Minus the slope of log(max error) against log(steps)."""
    errors = [
        (sampler.sample(velocity, noise, time_grid(n, dtype=torch.float64)) - exact).abs().max().item()
        for n in steps
    ]
    return -np.polyfit(np.log(steps), np.log(errors), 1)[0]


@pytest.mark.parametrize("name", ODE_SOLVERS)
def test_measured_convergence_order_on_gaussian_data(name):
    sampler = make(name)
    noise = torch.randn(64, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    order = measured_order(sampler, gaussian_velocity(), noise, MU + STD * noise)
    if name == "midpoint":
        # The midpoint rule's second-order error term cancels on this linear family.
        assert abs(order - 3) < 0.25, order
    else:
        assert abs(order - sampler.order) < 0.25, order


@pytest.mark.parametrize("name", ODE_SOLVERS)
def test_measured_convergence_order_matches_the_declared_order(name):
    """On ``dx/dt = -(1 + t) x`` (exact ``x0 * exp(-1.5)`` at t=1) every solver shows its order."""
    sampler = make(name)
    noise = torch.randn(8, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    order = measured_order(sampler, lambda x, t: -x * (1 + t.to(x.dtype)[:, None]), noise,
                           noise * math.exp(-1.5))
    assert abs(order - sampler.order) < 0.25, order


def sde_samples(sampler, steps=100, rows=4000, shift=1.0):
    generator = torch.Generator().manual_seed(2)
    noise = torch.randn(rows, 8, generator=generator, dtype=torch.float64)
    grid = sampler.make_time_grid(steps, shift, dtype=torch.float64)
    step_noise = torch.randn(steps, rows, 8, generator=generator, dtype=torch.float64)
    return noise, sampler.sample(gaussian_velocity(), noise, grid, step_noise)


@pytest.mark.parametrize("name, fields", [
    ("euler_maruyama", {}),
    ("euler_maruyama", {"last_step_size": 0.0}),
    ("flow_sde", {}),
])
def test_sde_samplers_reach_the_right_mean_and_variance(name, fields):
    noise, out = sde_samples(make(name, **fields))
    assert abs(out.mean().item() - MU) < 0.03, out.mean()
    assert abs(out.std().item() - STD) < 0.03, out.std()
    # The noise matters: the result is not the ODE's deterministic map.
    assert (out - (MU + STD * noise)).abs().mean() > 0.05


def test_release_sampler_at_shift_3_2_samples_t_0_922_unless_integrating_to_one():
    t = 0.96 / (3.2 - 2.2 * 0.96) + 0.04
    _, short = sde_samples(make("euler_maruyama"), shift=3.2)
    assert abs(short.mean().item() - t * MU) < 0.03
    assert abs(short.std().item() - math.sqrt(t**2 * STD**2 + (1 - t) ** 2)) < 0.03
    _, full = sde_samples(make("euler_maruyama", to_one=True), shift=3.2)
    assert abs(full.mean().item() - MU) < 0.03 and abs(full.std().item() - STD) < 0.03


def test_cps_keeps_the_mean_but_under_disperses():
    """Its fresh noise is a fixed fraction of each step's noise level, not shrinking with the step."""
    _, out = sde_samples(make("cps"))
    assert abs(out.mean().item() - MU) < 0.03
    assert 0.3 < out.std().item() < STD - 0.05


@pytest.mark.parametrize("name", SDE_SOLVERS)
def test_sde_samplers_without_step_noise_run_their_zero_noise_limit(name):
    sampler = make(name)
    noise = torch.randn(16, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grid = time_grid(10, 2.0, dtype=torch.float64)
    euler = make("euler").sample(gaussian_velocity(), noise, grid)
    torch.testing.assert_close(sampler.sample(gaussian_velocity(), noise, grid), euler)


@pytest.mark.parametrize("name", component_names("sampler"))
def test_samplers_only_evaluate_at_their_declared_times(name):
    """The promise behind `evaluation_times`, which lets heads precompute per time."""
    cls = component_class("sampler", name)
    sampler = cls(cls.config_class())
    grid = sampler.make_time_grid(7, 2.5)
    declared = sampler.evaluation_times(grid)
    if declared is None:
        pytest.skip(f"{name} makes no promise about its evaluation times")
    assert torch.all(declared[1:] >= declared[:-1])
    seen = []

    def velocity(x, t):
        assert t.shape == (x.shape[0],) and t.dtype == grid.dtype
        seen.append(t.clone())
        return -x

    noise = torch.randn(3, 5)
    step_noise = torch.randn(7, 3, 5) if sampler.stochastic else None
    sampler.sample(velocity, noise, grid, step_noise)
    assert len(seen) == 7 * sampler.evaluations_per_step
    for t in seen:
        assert all((declared == value).any() for value in t.tolist()), (t, declared)


@pytest.mark.parametrize("name", component_names("sampler"))
def test_samplers_are_exact_on_straight_paths_on_their_own_grid(name):
    cls = component_class("sampler", name)
    sampler = cls(cls.config_class())
    noise, target = torch.randn(4, 8), torch.randn(4, 8)
    grid = sampler.make_time_grid(6, 1.0)
    out = sampler.sample(lambda x, t: target - noise, noise, grid)
    torch.testing.assert_close(out, noise + grid[-1] * (target - noise), atol=1e-5, rtol=1e-5)


@given(st.floats(0.2, 8.0), st.lists(st.floats(0.0, 1.0), min_size=1, max_size=20))
def test_shift_is_the_sd3_shift_under_sigma_equal_one_minus_t(shift, values):
    t = torch.tensor(values, dtype=torch.float64)
    sigma = 1 - t
    expected_sigma = shift * sigma / (1 + (shift - 1) * sigma)
    torch.testing.assert_close(shift_time(t, shift), 1 - expected_sigma)


def test_shift_matches_diffusers_flow_match_scheduler():
    diffusers = pytest.importorskip("diffusers")
    for shift in (1.0, 3.0, 3.2):
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
        t = np.linspace(0.0, 0.95, 12)
        scheduler.set_timesteps(sigmas=(1 - t).tolist())
        ours = 1 - shift_time(torch.tensor(t), shift)
        torch.testing.assert_close(scheduler.sigmas[:-1].double(), ours, atol=1e-6, rtol=0)


def test_time_grids_run_from_zero_to_one_and_reject_bad_steps():
    grid = time_grid(5, 3.0)
    assert grid.shape == (6,) and grid[0] == 0 and grid[-1] == 1 and torch.all(grid.diff() > 0)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="num_steps must be an integer >= 1"):
            time_grid(bad)
    for bad in (0.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="shift must be finite and positive"):
            time_grid(4, bad)


def test_release_grid_stops_short_of_one_unless_told_to_integrate_to_one():
    grid = truncated_time_grid(50, 3.2, 0.04)
    assert grid.shape == (51,)
    expected_end = 0.96 / (3.2 - 2.2 * 0.96) + 0.04
    assert abs(grid[-1].item() - expected_end) < 1e-6 and abs(expected_end - 0.922) < 1e-3
    assert truncated_time_grid(50, 3.2, 0.04, to_one=True)[-1] == 1.0
    assert abs(truncated_time_grid(50, 1.0, 0.04)[-1].item() - 1.0) < 1e-6
    torch.testing.assert_close(truncated_time_grid(8, 2.0, 0.0), time_grid(8, 2.0))
    with pytest.raises(ValueError, match="last_step_size"):
        truncated_time_grid(8, 1.0, 1.0)
    with pytest.raises(ValueError, match="num_steps must be >= 2"):
        truncated_time_grid(1, 1.0, 0.04)


# ------------------------------------------------------ the release's formulas, on fixed noise
def release_euler_maruyama(velocity, x, num_steps, shift, last_step_size, eps, to_one=False):
    """The first release's loop, written out from its description (``to_one``: last step ends at 1)."""
    times = torch.linspace(0, 1 - last_step_size, num_steps, dtype=torch.float64)
    times = times / (shift - (shift - 1) * times)
    for i, (t_i, t_j) in enumerate(zip(times[:-1], times[1:])):
        dt = t_j - t_i
        v = velocity(x, t_i.expand(x.shape[0]))
        score = (t_i * v - x) / (1 - t_i)
        drift = v + (1 - t_i) * score
        mean = x + drift * dt
        x = mean + torch.sqrt(2 * (1 - t_i)) * (eps[i] * torch.sqrt(dt))
    final_step = 1 - times[-1] if to_one else last_step_size
    return x + velocity(x, times[-1].expand(x.shape[0])) * final_step


@pytest.mark.parametrize("shift", [1.0, 3.2])
def test_euler_maruyama_reproduces_the_first_release(shift):
    noise, eps = float64_draws(4, rows=6, dim=4, steps=12)
    velocity = gaussian_velocity()
    sampler = EulerMaruyamaSampler()
    grid = sampler.make_time_grid(12, shift, dtype=torch.float64)
    ours = sampler.sample(velocity, noise, grid, eps)
    reference = release_euler_maruyama(velocity, noise, 12, shift, 0.04, eps)
    torch.testing.assert_close(ours, reference, atol=1e-12, rtol=1e-12)


def test_euler_maruyama_can_integrate_to_one():
    noise, eps = float64_draws(5, rows=6, dim=4, steps=12)
    velocity = gaussian_velocity()
    release = EulerMaruyamaSampler()
    to_one = EulerMaruyamaSampler(EulerMaruyamaSamplerConfig(to_one=True))
    short_grid = release.make_time_grid(12, 3.2, dtype=torch.float64)
    full_grid = to_one.make_time_grid(12, 3.2, dtype=torch.float64)
    torch.testing.assert_close(short_grid[:-1], full_grid[:-1])
    short = release.sample(velocity, noise, short_grid, eps)
    full = to_one.sample(velocity, noise, full_grid, eps)
    # Both share the SDE part; only the final Euler step differs in length.
    expected = release_euler_maruyama(velocity, noise, 12, 3.2, 0.04, eps, to_one=True)
    torch.testing.assert_close(full, expected, atol=1e-12, rtol=1e-12)
    assert not torch.allclose(short, full)


def test_flow_sde_matches_the_flow_grpo_step_in_sigma_form():
    noise, eps = float64_draws(6, rows=5, dim=3, steps=8)
    velocity = gaussian_velocity()
    level = 0.7
    sampler = FlowSDESampler(FlowSDESamplerConfig(noise_level=level, first_step="next_time"))
    grid = sampler.make_time_grid(8, 2.0, dtype=torch.float64)
    ours = sampler.sample(velocity, noise, grid, eps)

    sigmas = 1 - grid  # 1 (noise) -> 0 (data)
    sample = noise
    for i in range(8):
        sigma, sigma_next, sigma_max = sigmas[i], sigmas[i + 1], sigmas[1]
        model_output = -velocity(sample, grid[i].expand(5))  # diffusers velocity: noise - data
        dt = sigma_next - sigma
        std = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * level
        mean = (sample * (1 + std**2 / (2 * sigma) * dt)
                + model_output * (1 + std**2 * (1 - sigma) / (2 * sigma)) * dt)
        sample = mean + std * torch.sqrt(-1 * dt) * eps[i]
    torch.testing.assert_close(ours, sample, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("shift", [1.0, 3.2])
def test_flow_sde_matches_the_later_release_sde_mode_on_shifted_grids(shift):
    noise, eps = float64_draws(8, rows=5, dim=3, steps=10)
    velocity = gaussian_velocity()
    sampler = FlowSDESampler()  # release first step, noise level 0.8
    grid = sampler.make_time_grid(10, shift, dtype=torch.float64)
    ours = sampler.sample(velocity, noise, grid, eps)

    # The release's sde mode in time form: its t = 0 stand-in is the last grid time below 1.
    last_below_one = grid[-2]
    x = noise
    for i in range(10):
        t, t_next = grid[i], grid[i + 1]
        v = velocity(x, t.expand(5))
        start, end = x - v * t, x + v * (1 - t)  # the noise and the data the velocity points to
        sigma = 1 - t
        std = torch.sqrt(sigma / (1 - torch.where(sigma == 1, last_below_one, sigma))) * 0.8
        x = start * (1 - t_next) + end * t_next - std**2 * (t_next - t) / (2 * sigma) * start
        x = x + std * torch.sqrt(t_next - t) * eps[i]
    torch.testing.assert_close(ours, x, atol=1e-12, rtol=1e-12)
    flow_grpo = FlowSDESampler(FlowSDESamplerConfig(first_step="next_time")).sample(velocity, noise, grid, eps)
    assert torch.allclose(flow_grpo, ours) == (shift == 1.0)


def test_cps_matches_the_coefficient_preserving_step_in_sigma_form():
    noise, eps = float64_draws(7, rows=5, dim=3, steps=8)
    velocity = gaussian_velocity()
    level = 0.6
    sampler = CoefficientPreservingSampler(CoefficientPreservingSamplerConfig(noise_level=level))
    grid = sampler.make_time_grid(8, 2.0, dtype=torch.float64)
    ours = sampler.sample(velocity, noise, grid, eps)

    sigmas = 1 - grid
    sample = noise
    for i in range(8):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        model_output = -velocity(sample, grid[i].expand(5))
        std = sigma_next * math.sin(level * math.pi / 2)
        data = sample - sigma * model_output
        predicted_noise = sample + model_output * (1 - sigma)
        sample = (data * (1 - sigma_next) + predicted_noise * torch.sqrt(sigma_next**2 - std**2)
                  + std * eps[i])
    torch.testing.assert_close(ours, sample, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("name", SDE_SOLVERS)
def test_stochastic_samplers_reject_step_noise_of_the_wrong_shape(name):
    sampler = make(name)
    with pytest.raises(ValueError, match="step_noise of shape"):
        sampler.sample(lambda x, t: x, torch.zeros(3, 4), time_grid(5), torch.zeros(5, 3, 2))


@pytest.mark.parametrize("cls, bad", [
    (EulerMaruyamaSamplerConfig, {"last_step_size": 1.0}),
    (FlowSDESamplerConfig, {"noise_level": -0.1}),
    (FlowSDESamplerConfig, {"first_step": "previous_time"}),
    (CoefficientPreservingSamplerConfig, {"noise_level": 1.5}),
])
def test_sampler_configs_name_the_bad_field(cls, bad):
    field = next(iter(bad))
    with pytest.raises(ValueError, match=field):
        cls(**bad)


def test_unknown_sampler_names_list_the_known_ones():
    with pytest.raises(ValueError, match=r"known: \[.*'euler'.*'heun'.*\]"):
        component_class("sampler", "rk45")


# ------------------------------------------------------------------- step schedules
def test_step_schedules():
    assert [ConstantSteps(5).steps_for(i, 10) for i in range(10)] == [5] * 10
    linear = LinearSteps(20, 5)
    steps = [linear.steps_for(i, 16) for i in range(16)]
    assert steps[0] == 20 and steps[-1] == 5 and steps == sorted(steps, reverse=True)
    assert linear.max_steps(16) == 20 and LinearSteps(3, 9).max_steps(4) == 9
    assert LinearSteps(7, 2).steps_for(0, 1) == 7
    assert as_step_schedule(4).steps_for(3, 8) == 4
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match="num_steps"):
            as_step_schedule(bad)
    with pytest.raises(ValueError, match="last"):
        LinearSteps(4, 0)


def test_a_sampler_takes_its_own_config_or_its_defaults():
    from nextstep.samplers import EulerMaruyamaSampler, HeunSampler
    from nextstep.samplers.euler_maruyama import EulerMaruyamaSamplerConfig

    assert HeunSampler().config == HeunSampler.config_class()
    custom = EulerMaruyamaSamplerConfig()
    assert EulerMaruyamaSampler(custom).config is custom
    with pytest.raises(TypeError, match=r"EulerMaruyamaSampler takes a EulerMaruyamaSamplerConfig \(or None for "
                                        r"its defaults\), found HeunSamplerConfig"):
        EulerMaruyamaSampler(HeunSampler.config_class())


@pytest.mark.parametrize("shift", [1e-7, 1e-12])
def test_a_shift_that_crowds_the_grid_is_refused(shift):
    from nextstep.samplers import truncated_time_grid

    message = rf"shift {shift!r} crowds the 8-step grid so that some of its times are equal in torch.float32"
    for make in (lambda: time_grid(8, shift), lambda: truncated_time_grid(8, shift, to_one=True)):
        with pytest.raises(ValueError, match=message):
            make()
    assert time_grid(8, shift, dtype=torch.float64).diff().gt(0).all()  # float64 still tells the times apart


@pytest.mark.parametrize("grid, found", [
    (torch.tensor([1.0, 0.5, 0.0]), r"found \[1, 0\.5, 0\]"),  # the sigma convention, from 1 to 0
    (torch.tensor([0.0, 0.5, 0.5, 1.0]), r"found \[0, 0\.5, 0\.5, 1\]"),
    (torch.tensor([0.0, 0.5, 2.0]), r"found \[0, 0\.5, 2\]"),  # past the data
    (torch.arange(-6.0, 5.0) / 4, r"found \[-1\.5, -1\.25, -1, -0\.75, -0\.5, -0\.25, \.\.\., 1\]"),
    (torch.tensor([0.0]), r"found shape \(1,\)"),
    (torch.zeros(2, 3), r"found shape \(2, 3\)"),
    ([0.0, 0.5, 1.0], "found a list"),
])
@pytest.mark.parametrize("name", component_names("sampler"))
def test_every_sampler_refuses_a_time_grid_that_does_not_run_from_noise_to_data(name, grid, found):
    cls = component_class("sampler", name)
    sampler = cls(cls.config_class())
    noise = torch.randn(3, 4)
    step_noise = torch.randn(4, 3, 4)
    with pytest.raises(ValueError, match=r"time_grid must be a 1-D tensor of at least 2 increasing times in \[0, 1\] "
                                         rf"\(t=0 noise, t=1 data\), {found}"):
        sampler.sample(lambda x, t: -x, noise, grid, step_noise)


STOCHASTIC_SAMPLERS = [name for name in component_names("sampler") if component_class("sampler", name).stochastic]


@pytest.mark.parametrize("name", STOCHASTIC_SAMPLERS)
def test_stochastic_samplers_take_more_step_noise_than_steps_and_use_the_first_slices(name):
    """Step noise is "at least (S, N, D)": a caller that draws for the longest schedule passes extra slices."""
    sampler = make(name)
    noise, eps = float64_draws(9, rows=3, dim=4, steps=7)
    grid = sampler.make_time_grid(5, 2.0, dtype=torch.float64)
    exact = sampler.sample(gaussian_velocity(), noise, grid, eps[:5])
    longer = sampler.sample(gaussian_velocity(), noise, grid, eps)
    torch.testing.assert_close(longer, exact, rtol=0, atol=0)


def test_euler_maruyama_without_a_last_step_makes_every_step_stochastic():
    noise, eps = float64_draws(10, rows=3, dim=4, steps=6)
    other = eps.clone()
    other[-1] += 1.0  # only the last step's noise differs
    velocity = gaussian_velocity()
    every = EulerMaruyamaSampler(EulerMaruyamaSamplerConfig(last_step_size=0.0))
    grid = every.make_time_grid(6, 1.0, dtype=torch.float64)
    assert not torch.allclose(every.sample(velocity, noise, grid, eps), every.sample(velocity, noise, grid, other))
    # The release's last step (last_step_size > 0) is a plain Euler step: its noise slice is unused.
    release = EulerMaruyamaSampler()
    grid = release.make_time_grid(6, 1.0, dtype=torch.float64)
    torch.testing.assert_close(release.sample(velocity, noise, grid, eps), release.sample(velocity, noise, grid, other),
                               rtol=0, atol=0)


def test_linear_steps_round_to_the_nearest_step_count():
    # first + (last - first) * index / (count - 1): 10, 8.33, 6.67, 5 -> rounded, not truncated.
    assert [LinearSteps(10, 5).steps_for(index, 4) for index in range(4)] == [10, 8, 7, 5]
    assert LinearSteps(10, 5).steps_for(2, 4) == 7
    assert [LinearSteps(2, 9).steps_for(index, 4) for index in range(4)] == [2, 4, 7, 9]  # 2, 4.33, 6.67, 9


def test_flow_sde_at_noise_level_zero_is_the_euler_solver_even_with_step_noise():
    """``noise_level = 0`` is accepted and is Euler on the same grid, whatever step noise is passed."""
    from nextstep.samplers import EulerSampler

    sampler = FlowSDESampler(FlowSDESamplerConfig(noise_level=0.0))
    noise, eps = float64_draws(11, rows=3, dim=4, steps=6)  # (N, D), (S, N, D)
    grid = sampler.make_time_grid(6, 2.0, dtype=torch.float64)
    euler = EulerSampler().sample(gaussian_velocity(), noise, grid)
    torch.testing.assert_close(sampler.sample(gaussian_velocity(), noise, grid, eps), euler, rtol=0, atol=0)


def test_cps_default_step_matches_the_closed_form_with_the_release_noise_level():
    """One default CPS step from t=0.25 to t'=0.5: ``t' data + sqrt(sigma'^2 - s^2) noise + s eps``, a = 0.8."""
    sampler = CoefficientPreservingSampler()
    noise, eps = float64_draws(12, rows=3, dim=4, steps=1)  # x (N, D), eps (1, N, D)
    grid = torch.tensor([0.25, 0.5], dtype=torch.float64)
    out = sampler.sample(lambda x, t: 2 * x + 1, noise, grid, eps)
    v = 2 * noise + 1
    data, predicted_noise = noise + 0.75 * v, noise - 0.25 * v
    fresh = 0.5 * math.sin(0.8 * math.pi / 2)
    expected = 0.5 * data + math.sqrt(0.25 - fresh**2) * predicted_noise + fresh * eps[0]
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@given(st.integers(1, 40), st.integers(1, 40), st.integers(1, 30))
def test_linear_steps_max_steps_is_the_largest_count_any_token_gets(first, last, count):
    """``max_steps(count)`` equals the largest ``steps_for`` over the ``count`` tokens (noise is drawn for it)."""
    schedule = LinearSteps(first, last)
    assert schedule.max_steps(count) == max(schedule.steps_for(index, count) for index in range(count))


def test_check_step_counts_builds_the_grids_at_the_requested_shift():
    """A shift that crowds a token's grid is refused up front, before any token is sampled."""
    from nextstep.samplers import EulerSampler
    from nextstep.samplers.step_schedule import check_step_counts

    check_step_counts(EulerSampler(), ConstantSteps(8), 4, shift=3.0)
    with pytest.raises(ValueError, match="crowds the 8-step grid"):
        check_step_counts(EulerSampler(), ConstantSteps(8), 4, shift=1e-7)
    with pytest.raises(ValueError, match=r"shift 1e-07 crowds the \d+-step grid"):
        check_step_counts(EulerSampler(), LinearSteps(2, 8), 3, shift=1e-7)
