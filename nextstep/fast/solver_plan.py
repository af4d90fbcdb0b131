"""Samplers written as tables: the stages of one token's integration, for the fused token step.

Legend: S intervals of the time grid, E evaluation times, K stages, R rows, D token dim.

Each stage evaluates the guided velocity at one of the sampler's evaluation
times on one of two states (the ``state`` x, or a ``trial`` point such as
Heun's predictor), then writes ``a * x + b * v + c * extra`` to one of them
(see `nextstep.kernels.guided_update`). A plan exists for the samplers whose
updates have that form: `EulerSampler`, `HeunSampler`, `MidpointSampler`,
`AdamsBashforthSampler` (each stage adds the velocity kept by the one before
and keeps its own) and `EulerMaruyamaSampler` (the first release's); others run
through the generic path (their own ``sample``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nextstep.samplers.adams_bashforth import AdamsBashforthSampler, adams_bashforth_coefficients
from nextstep.samplers.base import Sampler
from nextstep.samplers.euler import EulerSampler
from nextstep.samplers.euler_maruyama import EulerMaruyamaSampler
from nextstep.samplers.heun import HeunSampler
from nextstep.samplers.midpoint import MidpointSampler

#: The sampler classes with a plan (exact types: a subclass may change ``sample``).
PLANNED_SAMPLERS = (EulerSampler, HeunSampler, MidpointSampler, AdamsBashforthSampler, EulerMaruyamaSampler)

STATE, TRIAL = "state", "trial"
NOISE, VELOCITY = "noise", "velocity"


@dataclass(frozen=True)
class SolverStage:
    """One velocity evaluation and the update that uses it.

    Attributes:
        time_index: which evaluation time (row of the plan's ``times``).
        source: the state the head evaluates, ``state`` or ``trial``.
        target: where ``a * x + b * v + c * extra`` goes, ``state`` or ``trial``
            (``x`` is always the state).
        extra: None, ``noise`` (slice ``noise_index`` of the step noise) or
            ``velocity`` (the velocity kept by an earlier stage).
        keep_velocity: keep this stage's guided velocity for a later stage.
        noise_index: the step-noise slice of a ``noise`` stage, else -1.
    """

    time_index: int
    source: str = STATE
    target: str = STATE
    extra: str | None = None
    keep_velocity: bool = False
    noise_index: int = -1


@dataclass
class SolverPlan:
    """Every stage of one token's integration and their numbers.

    Attributes:
        stages: the K stages in order.
        times: (E,) float32 evaluation times (the sampler's ``evaluation_times``).
        coefficients: (K, 3) float32 ``(a, b, c)`` per stage.
        noise_steps: step-noise slices the plan reads (0 for a deterministic plan).
    """

    stages: tuple[SolverStage, ...]
    times: torch.Tensor
    coefficients: torch.Tensor
    noise_steps: int = 0

    def __post_init__(self) -> None:
        check_plan(self)

    @property
    def signature(self) -> tuple:
        """What a captured graph depends on (the stage structure, not the numbers)."""
        return (self.stages, self.times.shape[0], self.noise_steps)


def check_plan(plan: SolverPlan) -> None:
    """Raise ``ValueError`` unless every stage reads only what an earlier stage wrote.

    The fused step's ``trial`` point and kept velocity are scratch buffers that are
    not cleared between tokens, so a stage that read them before any stage wrote
    them would read the previous token's (or uninitialised) values.
    """
    stages, times, coefficients = plan.stages, plan.times, plan.coefficients
    if times.ndim != 1:
        raise ValueError(f"a plan's times must be (E,), found shape {tuple(times.shape)}")
    if tuple(coefficients.shape) != (len(stages), 3):
        raise ValueError(f"a plan of {len(stages)} stages needs ({len(stages)}, 3) coefficients, "
                         f"found shape {tuple(coefficients.shape)}")
    if not isinstance(plan.noise_steps, int) or plan.noise_steps < 0:
        raise ValueError(f"noise_steps must be a count >= 0, found {plan.noise_steps!r}")
    trial_written = velocity_kept = False
    for number, stage in enumerate(stages):
        where = f"stage {number} ({stage})"
        if stage.source not in (STATE, TRIAL) or stage.target not in (STATE, TRIAL):
            raise ValueError(f"{where}: source and target must be {STATE!r} or {TRIAL!r}")
        if stage.extra not in (None, NOISE, VELOCITY):
            raise ValueError(f"{where}: extra must be None, {NOISE!r} or {VELOCITY!r}")
        if not 0 <= stage.time_index < times.shape[0]:
            raise ValueError(f"{where}: time_index outside the plan's {times.shape[0]} evaluation times")
        if stage.source == TRIAL and not trial_written:
            raise ValueError(f"{where} evaluates the trial point before any stage writes it")
        if stage.extra == VELOCITY and not velocity_kept:
            raise ValueError(f"{where} adds a kept velocity before any stage keeps one")
        if stage.extra == NOISE and not 0 <= stage.noise_index < plan.noise_steps:
            raise ValueError(f"{where}: noise_index outside the plan's {plan.noise_steps} step-noise slices")
        trial_written |= stage.target == TRIAL
        velocity_kept |= stage.keep_velocity


def plan_reason(sampler: Sampler) -> str | None:
    """None when `solver_plan` can write ``sampler`` as a plan, else why not."""
    if type(sampler) not in PLANNED_SAMPLERS:
        names = ", ".join(cls.__name__ for cls in PLANNED_SAMPLERS)
        return f"{type(sampler).__name__} has no fused plan (planned samplers: {names})"
    return None


def solver_plan(sampler: Sampler, time_grid: torch.Tensor, stochastic: bool = True) -> SolverPlan:
    """The stages ``sampler.sample`` runs on ``time_grid``, as a `SolverPlan`.

    Args:
        sampler: one of `PLANNED_SAMPLERS` (exact type).
        time_grid: (S + 1,) the grid ``sampler.make_time_grid`` made.
        stochastic: whether step noise will be given (a stochastic sampler without
            it runs its deterministic limit, as its ``sample`` does).

    Returns:
        the plan; ``ValueError`` for a sampler without one.
    """
    reason = plan_reason(sampler)
    if reason is not None:
        raise ValueError(reason)
    if time_grid.ndim != 1 or time_grid.shape[0] < 2:
        raise ValueError(f"time_grid must be (S + 1,) with S >= 1 steps, found shape {tuple(time_grid.shape)}")
    grid = time_grid.detach().float().cpu()
    num_steps = grid.shape[0] - 1
    # The eager samplers take steps in float32 from the float32 grid; so do the plans.
    steps = grid.diff().double()
    start = grid[:-1].double()
    stages: list[SolverStage] = []
    rows: list[tuple[float, float, float]] = []
    noise_steps = 0
    if isinstance(sampler, HeunSampler):
        for index in range(num_steps):
            dt = float(steps[index])
            half = 0.5 * dt  # exact, as in the eager sampler
            stages.append(SolverStage(index, STATE, TRIAL, keep_velocity=True))
            rows.append((1.0, dt, 0.0))
            stages.append(SolverStage(index + 1, TRIAL, STATE, extra=VELOCITY))
            rows.append((1.0, half, half))
    elif isinstance(sampler, MidpointSampler):
        for index in range(num_steps):
            dt = float(steps[index])
            stages.append(SolverStage(2 * index, STATE, TRIAL))
            rows.append((1.0, 0.5 * dt, 0.0))
            stages.append(SolverStage(2 * index + 1, TRIAL, STATE))
            rows.append((1.0, dt, 0.0))
    elif isinstance(sampler, AdamsBashforthSampler):
        current, previous = adams_bashforth_coefficients(grid)
        for index in range(num_steps):
            # The kept velocity is read before this stage's own replaces it (element by element).
            stages.append(SolverStage(index, extra=VELOCITY if index else None, keep_velocity=True))
            rows.append((1.0, float(current[index]), float(previous[index])))
    elif isinstance(sampler, EulerMaruyamaSampler) and stochastic:
        noise_steps = num_steps - 1 if sampler.config.last_step_size > 0 else num_steps
        for index in range(num_steps):
            dt, t = float(steps[index]), float(start[index])
            if index < noise_steps:
                stages.append(SolverStage(index, extra=NOISE, noise_index=index))
                rows.append((1.0 - dt, (1.0 + t) * dt, (2.0 * (1.0 - t) * dt) ** 0.5))
            else:
                stages.append(SolverStage(index))
                rows.append((1.0, dt, 0.0))
    else:  # Euler, and Euler-Maruyama without noise (its probability-flow limit)
        for index in range(num_steps):
            stages.append(SolverStage(index))
            rows.append((1.0, float(steps[index]), 0.0))
    times = sampler.evaluation_times(time_grid).detach().float().cpu()
    return SolverPlan(tuple(stages), times, torch.tensor(rows, dtype=torch.float32), noise_steps)
