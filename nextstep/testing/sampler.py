"""The contract of `nextstep.samplers.base.Sampler`."""

from __future__ import annotations

import torch

from nextstep.samplers.base import Sampler
from nextstep.testing.assertions import assert_close


def check_sampler(sampler: Sampler, *, steps: tuple[int, ...] = (1, 3, 10), shift: float = 2.0, rows: int = 4,
                  dim: int = 8, seed: int = 0, atol: float = 1e-5) -> None:
    """Check a sampler's contract; raise ``AssertionError`` naming the property that fails.

    For each step count of ``steps`` whose grid `make_time_grid` builds (a count
    it refuses with ``ValueError`` is skipped):

    - the grid is (S + 1,), increasing, from 0;
    - without step noise, a constant velocity is integrated exactly (every
      consistent solver does), and each row's result is its own;
    - every ``t`` passed to the velocity is (N,), and, where `evaluation_times`
      makes its promise, bitwise one of those times;
    - a stochastic sampler runs with step noise of shape (S, N, D), finitely,
      and its result depends on that noise.

    Also ``order`` and ``evaluations_per_step`` are integers >= 1.
    """
    name = type(sampler).__name__
    for attribute in ("order", "evaluations_per_step"):
        value = getattr(sampler, attribute, None)
        assert isinstance(value, int) and value >= 1, f"{name}: {attribute} must be an integer >= 1, found {value!r}"
    generator = torch.Generator().manual_seed(seed)
    noise, target = torch.randn(rows, dim, generator=generator), torch.randn(rows, dim, generator=generator)
    checked = 0
    for count in steps:
        try:
            grid = sampler.make_time_grid(count, shift)
        except ValueError:
            continue  # a count the sampler refuses by name (generation checks it before any work)
        checked += 1
        assert grid.shape == (count + 1,), f"{name}: a grid of {count} steps must be ({count + 1},), found " \
                                           f"{tuple(grid.shape)}"
        assert grid[0] == 0 and bool((grid.diff() > 0).all()), f"{name}: the grid must rise from 0, found {grid}"
        promised = sampler.evaluation_times(grid)
        allowed = None if promised is None else set(promised.tolist())
        seen: list[torch.Tensor] = []

        def constant(x, t):
            assert t.shape == (x.shape[0],), f"{name}: t must be (N,) = ({x.shape[0]},), found {tuple(t.shape)}"
            seen.append(t)
            return target - noise

        out = sampler.sample(constant, noise, grid)
        expected = noise + (grid[-1] - grid[0]) * (target - noise)
        assert_close(out, expected, atol, f"{name}: a constant velocity is not integrated exactly in {count} step(s)")
        alone = torch.cat([sampler.sample(lambda x, t, i=i: (target - noise)[i:i + 1], noise[i:i + 1], grid)
                           for i in range(rows)])
        assert_close(alone, out, atol, f"{name}: rows of the result depend on each other")
        if allowed is not None:
            # A velocity that depends on t, so that a time outside the promise would be used.
            seen.clear()
            sampler.sample(lambda x, t: seen.append(t) or x * t[:, None], noise, grid)
            stray = sorted({value for t in seen for value in t.tolist()} - allowed)
            assert not stray, (f"{name}: evaluation_times promised {sorted(allowed)} in {count} step(s), but the "
                               f"velocity was called at {stray}")
        if sampler.stochastic:
            step_noise = torch.randn(count, rows, dim, generator=generator)
            noisy = sampler.sample(lambda x, t: target - x, noise, grid, step_noise)
            other = sampler.sample(lambda x, t: target - x, noise, grid, torch.randn(count, rows, dim,
                                                                                        generator=generator))
            assert noisy.shape == (rows, dim) and torch.isfinite(noisy).all(), f"{name}: a stochastic sample " \
                                                                                "must be (N, D) and finite"
            assert count == 1 or not torch.equal(noisy, other), f"{name}: is stochastic but ignores step_noise"
    assert checked, f"{name}: make_time_grid refused every step count of {steps}"
