"""Holding a sampler to its `evaluation_times` promise during generation.

A sampler that returns times from `nextstep.samplers.base.Sampler.evaluation_times` lets the
image head tabulate its time-dependent work once per generation and look it up per call; a
time outside the promise would silently take another time's row. Generation therefore samples
the first token of each step count through `PromisedTimesCheck`, which notes every ``t``
without synchronising the device, and confirms them once that token is sampled.
"""

from __future__ import annotations

import torch

from nextstep.samplers.base import Sampler, VelocityFn


class PromisedTimesCheck:
    """A velocity function that passes every call on to ``velocity_fn`` and notes its ``t``.

    Args:
        velocity_fn: the velocity the sampler is given, ``fn(x_t (N, D), t (N,)) -> (N, D)``.
        times: (E,) the times the sampler promised for this grid.
    """

    def __init__(self, velocity_fn: VelocityFn, times: torch.Tensor):
        self.velocity_fn = velocity_fn
        self.times = times
        self.seen: list[torch.Tensor] = []

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.seen.append(t.detach().reshape(-1))
        return self.velocity_fn(x_t, t)

    def confirm(self, sampler: Sampler, steps: int) -> None:
        """Raise ``ValueError`` naming ``sampler`` and the stray times when a noted ``t`` is not bitwise one
        of the promised times (one device synchronisation)."""
        if not self.seen:
            return
        used = torch.cat(self.seen).to(self.times.dtype)
        stray = used[~torch.isin(used, self.times)]
        if stray.numel():
            raise ValueError(
                f"{type(sampler).__name__}.evaluation_times promised the velocity at {self.times.tolist()} on a grid "
                f"of {steps} step(s), but sample evaluates it at {sorted(set(stray.tolist()))} too; return every "
                "time sample uses (bitwise), or None")


def sample_checking_promise(sampler: Sampler, velocity_fn: VelocityFn, noise: torch.Tensor, time_grid: torch.Tensor,
                            step_noise: torch.Tensor | None, promised: torch.Tensor | None) -> torch.Tensor:
    """``sampler.sample(velocity_fn, noise, time_grid, step_noise)``, checked against ``promised`` (the
    sampler's `evaluation_times` for ``time_grid``; None: unchecked). A call at a time beyond the promised
    ones, which the head's table cannot look up, is named the same way rather than as an index error."""
    if promised is None:
        return sampler.sample(velocity_fn, noise, time_grid, step_noise)
    check = PromisedTimesCheck(velocity_fn, promised)
    steps = time_grid.numel() - 1
    try:
        token = sampler.sample(check, noise, time_grid, step_noise)
    except (IndexError, RuntimeError):
        check.confirm(sampler, steps)
        raise
    check.confirm(sampler, steps)
    return token


__all__ = ["PromisedTimesCheck", "sample_checking_promise"]
