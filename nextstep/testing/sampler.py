"""The contract of `nextstep.samplers.base.Sampler`."""

from __future__ import annotations

import math

import torch

from nextstep.samplers.base import Sampler
from nextstep.testing.assertions import assert_close, assert_finite
from nextstep.testing.parameters import unchanged_random_state


def _linear_field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``dx/dt = -x + 2t``: depends on the state and the time, exact solution in `_linear_solution`."""
    return 2 * t.to(x.dtype)[:, None] - x


def _linear_solution(x0: torch.Tensor, t0: float, t1: float) -> torch.Tensor:
    return 2 * t1 - 2 + (x0 - 2 * t0 + 2) * math.exp(-(t1 - t0))


#: Mean and standard deviation of the 1-D Gaussian whose flow `_gaussian_velocity` gives exactly.
GAUSSIAN_TARGET = (0.5, 0.3)


def _gaussian_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The exact velocity ``E[x1 - x0 | x_t = x]`` of the path ``x_t = (1 - t) x0 + t x1`` from x0 ~ N(0, 1) to
    x1 ~ N(m, s^2) (`GAUSSIAN_TARGET`): an integrator that follows it ends at that Gaussian."""
    mean, std = GAUSSIAN_TARGET
    t = t.to(x.dtype)[:, None]
    variance = (1 - t) ** 2 + t ** 2 * std ** 2
    return mean + (t * std ** 2 - (1 - t)) / variance * (x - t * mean)


def check_sampler(sampler: Sampler, *, steps: tuple[int, ...] = (1, 3, 10), shift: float = 2.0, rows: int = 4,
                  dim: int = 8, seed: int = 0, atol: float = 1e-5) -> None:
    """Check a sampler's contract; raise ``AssertionError`` naming the property that fails.

    For each step count of ``steps`` whose grid `make_time_grid` builds (a count
    it refuses with ``ValueError`` is skipped):

    - the grid is (S + 1,), increasing, from 0, in the dtype and on the device asked
      for (as generation asks: ``make_time_grid(S, shift, device=...)``);
    - without step noise, a constant velocity is integrated exactly (every
      consistent solver does), and each row's result is its own, also for a velocity
      that depends on the state and the time;
    - every ``t`` passed to the velocity is (N,) in the grid's dtype, and, where `evaluation_times`
      makes its promise, bitwise one of those times;
    - a stochastic sampler runs with step noise of shape (S, N, D), finitely, each
      row on its own noise, and its result depends on every step's noise but
      perhaps the last's.

    On ``dx/dt = -x + 2t`` (exact solution known) the error with the most steps is
    at most half that with the fewest, and four times as many steps at least halve
    it again: a solver that skips steps, reads the wrong times or the wrong states
    fails here. Two calls with the same inputs give the same result (a sampler
    draws no random numbers of its own: its noise is what it is given). The grid
    given is the one followed: a grid that stops short of its last time is
    integrated to where it stops, and another shift's grid gives another result.
    `evaluation_times`, where it promises, gives increasing times in the grid's
    dtype.

    The sample of the exact flow to a 1-D Gaussian (`GAUSSIAN_TARGET`, 50 steps,
    shift 1, or ``shift`` for a sampler that refuses shift 1, with step noise for
    a stochastic sampler) has about its mean (within
    0.1) and standard deviation (within a factor of 2): a loose check that catches
    a wrong drift or noise scale (a flipped score term), not a small bias.

    A stochastic sampler integrates its deterministic limit when given no step
    noise, as the built-in ones do; one that refuses ``step_noise=None`` with
    ``ValueError`` (generation always gives stochastic samplers their noise) skips
    the checks without noise. Also ``order`` and ``evaluations_per_step`` are
    integers >= 1, and the stated ``order`` is reached: from 16 to 32 steps in
    float64 the error on ``dx/dt = -x + 2t`` falls by at least ``2 ** (order -
    0.5)``. The global random state is left as it was.
    """
    with unchanged_random_state():
        _check_sampler(sampler, steps, shift, rows, dim, seed, atol)


def _check_sampler(sampler: Sampler, steps, shift, rows, dim, seed, atol) -> None:
    name = type(sampler).__name__
    for attribute in ("order", "evaluations_per_step"):
        value = getattr(sampler, attribute, None)
        assert isinstance(value, int) and not isinstance(value, bool) and value >= 1, \
            f"{name}: {attribute} must be an integer >= 1, found {value!r}"
    generator = torch.Generator().manual_seed(seed)
    noise, target = torch.randn(rows, dim, generator=generator), torch.randn(rows, dim, generator=generator)
    errors: list[tuple[int, float]] = []
    checked = 0
    for count in steps:
        try:
            grid = sampler.make_time_grid(count, shift, device="cpu")
        except ValueError:
            continue  # a count the sampler refuses by name (generation checks it before any work)
        except TypeError as error:
            raise AssertionError(f"{name}: make_time_grid must take device= and dtype= as generation passes them, "
                                 f"raised TypeError: {error}") from error
        checked += 1
        assert grid.shape == (count + 1,), f"{name}: a grid of {count} steps must be ({count + 1},), found " \
                                           f"{tuple(grid.shape)}"
        assert grid[0] == 0 and bool((grid.diff() > 0).all()), f"{name}: the grid must rise from 0, found {grid}"
        wide = sampler.make_time_grid(count, shift, device="cpu", dtype=torch.float64)
        assert wide.dtype == torch.float64 and wide.device.type == "cpu", (
            f"{name}: make_time_grid(..., dtype=float64) must give a float64 grid on the device asked for, found "
            f"{wide.dtype} on {wide.device}")
        promised = sampler.evaluation_times(grid)
        if promised is not None:
            assert promised.ndim == 1 and promised.dtype == grid.dtype and bool((promised.diff() > 0).all()), (
                f"{name}: evaluation_times must give increasing (E,) times in the grid's dtype {grid.dtype}, found "
                f"{promised.dtype} {promised.tolist()}")
        allowed = None if promised is None else set(promised.tolist())
        seen: list[torch.Tensor] = []

        def constant(x, t):
            assert t.shape == (x.shape[0],), f"{name}: t must be (N,) = ({x.shape[0]},), found {tuple(t.shape)}"
            assert t.dtype == grid.dtype, f"{name}: t must be in the grid's dtype {grid.dtype}, found {t.dtype}"
            seen.append(t)
            return target - noise

        try:
            out = sampler.sample(constant, noise, grid)
        except ValueError:
            if not sampler.stochastic:
                raise
            out = None  # a stochastic sampler that needs its step noise: no deterministic limit to check
        if out is not None:
            assert torch.equal(sampler.sample(constant, noise, grid), out), (
                f"{name}: two calls with the same inputs give different results: a sampler draws no random numbers "
                "of its own (a stochastic one is given its step noise)")
            expected = noise + (grid[-1] - grid[0]) * (target - noise)
            assert_close(out, expected, atol, f"{name}: a constant velocity is not integrated exactly in {count} "
                                              "step(s)")
            alone = torch.cat([sampler.sample(lambda x, t, i=i: (target - noise)[i:i + 1], noise[i:i + 1], grid)
                               for i in range(rows)])
            assert_close(alone, out, atol, f"{name}: rows of the result depend on each other")
            linear = sampler.sample(_linear_field, noise, grid)
            alone = torch.cat([sampler.sample(_linear_field, noise[i:i + 1], grid) for i in range(rows)])
            assert_close(alone, linear, atol, f"{name}: rows of the result depend on each other (for a velocity of "
                                              "the state and the time)")
            exact = _linear_solution(noise, float(grid[0]), float(grid[-1]))
            errors.append((count, float((linear - exact).abs().max())))
            _check_the_grid_is_followed(sampler, name, count, shift, grid, noise, target, linear, atol)
        if allowed is not None:
            # A velocity that depends on t, so that a time outside the promise would be used.
            seen.clear()
            zeros = torch.zeros(count, rows, dim) if sampler.stochastic else None
            sampler.sample(lambda x, t: seen.append(t) or x * t[:, None], noise, grid, zeros)
            stray = sorted({value for t in seen for value in t.tolist()} - allowed)
            assert not stray, (f"{name}: evaluation_times promised {sorted(allowed)} in {count} step(s), but the "
                               f"velocity was called at {stray}")
        if sampler.stochastic:
            _check_step_noise(sampler, name, count, grid, noise, target, generator, atol)
    assert checked, f"{name}: make_time_grid refused every step count of {steps}"
    if len(errors) >= 2:
        (fewest, first), (most, last) = errors[0], errors[-1]
        assert last <= 0.5 * first, (f"{name}: on dx/dt = -x + 2t the error with {most} steps ({last:.3g}) is not "
                                     f"below half that with {fewest} ({first:.3g}): the solver does not converge")
    if errors and errors[-1][1] > 1e-4:  # above float32's rounding: quadrupling the steps must tell
        most, last = errors[-1]
        fine_grid = sampler.make_time_grid(4 * most, shift, device="cpu")
        finer = sampler.sample(_linear_field, noise, fine_grid)
        error = float((finer - _linear_solution(noise, float(fine_grid[0]), float(fine_grid[-1]))).abs().max())
        assert error <= 0.5 * last, (f"{name}: on dx/dt = -x + 2t the error with {4 * most} steps ({error:.3g}) is "
                                     f"not below half that with {most} ({last:.3g}): the solver does not converge "
                                     "(a first-order one divides it by about 4)")
    if errors:
        _check_order(sampler, name, shift, noise)
    _check_gaussian_marginal(sampler, name, seed, shift)


#: The step counts whose errors `_check_order` compares, and the slack it gives the measured order.
ORDER_STEPS, ORDER_SLACK = (16, 32), 0.5


def _check_order(sampler, name, shift, noise) -> None:
    """The stated ``order`` is reached: on ``dx/dt = -x + 2t`` in float64, doubling the steps from 16 to 32 divides
    the error by at least ``2 ** (order - ORDER_SLACK)`` (an Euler step claiming order 2, or a Runge-Kutta
    tableau with a wrong weight, does not)."""
    errors = []
    for count in ORDER_STEPS:
        try:
            grid = sampler.make_time_grid(count, shift, device="cpu", dtype=torch.float64)
        except ValueError:
            return  # a step count the sampler refuses
        out = sampler.sample(_linear_field, noise.double(), grid)
        errors.append(float((out - _linear_solution(noise.double(), float(grid[0]), float(grid[-1]))).abs().max()))
    if errors[1] < 1e-12:  # at float64's rounding: nothing left to measure
        return
    measured = math.log2(errors[0] / errors[1])
    assert measured >= sampler.order - ORDER_SLACK, (
        f"{name}: order is {sampler.order}, but on dx/dt = -x + 2t in float64 the error falls from {errors[0]:.3g} "
        f"({ORDER_STEPS[0]} steps) to {errors[1]:.3g} ({ORDER_STEPS[1]} steps), order {measured:.2f}")


def _check_the_grid_is_followed(sampler, name, count, shift, grid, noise, target, linear, atol) -> None:
    """A grid that stops short ends where it stops; another shift's grid (other interior times) changes the result."""
    if count >= 2:
        short = grid[:-1]
        try:
            out = sampler.sample(lambda x, t: target - noise, noise, short)
        except ValueError:
            out = None  # a grid the sampler refuses by name
        if out is not None:
            assert_close(out, noise + (short[-1] - short[0]) * (target - noise), atol,
                         f"{name}: a grid that stops at t = {float(short[-1]):.4g} is not integrated to there (does "
                         "the sampler follow the grid it is given?)")
    other_shift = 1.0 if shift != 1.0 else 3.0
    try:
        other = sampler.make_time_grid(count, other_shift, device="cpu")
    except ValueError:
        return
    if not torch.equal(other, grid):
        assert not torch.equal(sampler.sample(_linear_field, noise, other), linear), (
            f"{name}: the grids of shift {shift} and {other_shift} give the same result in {count} steps (does the "
            "sampler follow the grid it is given?)")


def _check_gaussian_marginal(sampler, name, seed, shift, steps: int = 50, samples: int = 4000) -> None:
    """The exact flow to a 1-D Gaussian, sampled, has about the Gaussian's mean and standard deviation (on the
    grid of shift 1, or of the kit's ``shift`` where the sampler refuses shift 1; the flow is exact on any grid)."""
    for grid_shift in dict.fromkeys((1.0, shift)):
        try:
            grid = sampler.make_time_grid(steps, grid_shift, device="cpu")
            break
        except ValueError:
            continue
    else:
        return
    generator = torch.Generator().manual_seed(seed + 1)
    start = torch.randn(samples, 1, generator=generator)
    step_noise = torch.randn(steps, samples, 1, generator=generator) if sampler.stochastic else None
    out = sampler.sample(_gaussian_velocity, start, grid, step_noise)
    mean, std = GAUSSIAN_TARGET
    found_mean, found_std = float(out.mean()), float(out.std())
    assert abs(found_mean - mean) <= 0.1 and std / 2 <= found_std <= 2 * std, (
        f"{name}: sampling the exact flow to N({mean}, {std}^2) in {steps} steps gives mean {found_mean:.3f} and "
        f"standard deviation {found_std:.3f} (a wrong drift or noise scale)")


def _check_step_noise(sampler, name, count, grid, noise, target, generator, atol) -> None:
    rows, dim = noise.shape

    def velocity(x, t):
        return target - x

    step_noise = torch.randn(count, rows, dim, generator=generator)
    noisy = sampler.sample(velocity, noise, grid, step_noise)
    assert torch.equal(sampler.sample(velocity, noise, grid, step_noise), noisy), (
        f"{name}: two calls with the same inputs and step noise give different results: a stochastic sampler draws "
        "from the step noise it is given, not from random numbers of its own")
    assert noisy.shape == (rows, dim), f"{name}: a stochastic sample must be (N, D), found {tuple(noisy.shape)}"
    assert_finite(noisy, f"{name}: a stochastic sample")
    alone = torch.cat([sampler.sample(lambda x, t, i=i: target[i:i + 1] - x, noise[i:i + 1], grid,
                                      step_noise[:, i:i + 1]) for i in range(rows)])
    assert_close(alone, noisy, atol, f"{name}: rows of a stochastic sample depend on each other (or on other rows' "
                                     "step noise)")
    for index in range(count - 1):  # the last step may add no noise (as the release's does)
        changed = step_noise.clone()
        changed[index] = torch.randn(rows, dim, generator=generator)
        assert not torch.equal(sampler.sample(velocity, noise, grid, changed), noisy), (
            f"{name}: is stochastic but ignores the noise of step {index} of {count}")
