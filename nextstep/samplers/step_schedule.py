"""How many solver steps each image token gets: fixed, or fewer for later tokens.

Later tokens of an image are conditioned on more context, so their per-token
distributions tend to be sharper and a coarser integration may suffice. A
schedule maps a token's index to its number of steps; every row of a batch is
at the same index, so shapes stay the same for all rows.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from nextstep.samplers.time_grid import check_num_steps


class StepSchedule(ABC):
    """Number of head steps for the token at ``index`` of ``count``."""

    @abstractmethod
    def steps_for(self, index: int, count: int) -> int:
        """Steps (>= 1) for token ``index`` in ``[0, count)``."""

    def max_steps(self, count: int) -> int:
        """The largest step count over ``count`` tokens (per-token noise is drawn for this many)."""
        return max(self.steps_for(index, count) for index in range(count))


class ConstantSteps(StepSchedule):
    """The same number of steps for every token.

    Args:
        num_steps: steps per token (>= 1).
    """

    def __init__(self, num_steps: int):
        check_num_steps(num_steps)
        self.num_steps = num_steps

    def steps_for(self, index: int, count: int) -> int:
        return self.num_steps

    def max_steps(self, count: int) -> int:
        return self.num_steps

    def __repr__(self) -> str:
        return f"ConstantSteps({self.num_steps})"


class LinearSteps(StepSchedule):
    """Steps interpolated linearly from ``first`` (token 0) to ``last`` (the final token), rounded.

    Args:
        first: steps of the first token (>= 1).
        last: steps of the last token (>= 1).
    """

    def __init__(self, first: int, last: int):
        check_num_steps(first, "first")
        check_num_steps(last, "last")
        self.first, self.last = first, last

    def steps_for(self, index: int, count: int) -> int:
        fraction = index / (count - 1) if count > 1 else 0.0
        return int(round(self.first + (self.last - self.first) * fraction))

    def max_steps(self, count: int) -> int:
        return max(self.first, self.last) if count > 1 else self.first

    def __repr__(self) -> str:
        return f"LinearSteps({self.first}, {self.last})"


def as_step_schedule(num_steps: int | StepSchedule) -> StepSchedule:
    """An integer becomes `ConstantSteps`; a schedule is returned as is."""
    if isinstance(num_steps, StepSchedule):
        return num_steps
    check_num_steps(num_steps)
    return ConstantSteps(num_steps)


def check_step_counts(sampler, schedule: StepSchedule, count: int, shift: float = 1.0) -> None:
    """Build the time grid of every step count ``schedule`` gives ``count`` tokens, so that a count
    ``sampler`` refuses (Euler-Maruyama's final deterministic step needs 2) raises ``ValueError`` before
    any work, not at the token that first uses it."""
    for steps in sorted({schedule.steps_for(index, count) for index in range(count)}):
        sampler.make_time_grid(steps, shift)
