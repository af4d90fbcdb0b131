"""A sampler that runs another one unchanged and keeps every velocity call, to study what a solver does.

Legend: N rows (the images of a call, each candidate a row), D token width, S grid intervals.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nextstep.samplers.base import Sampler, VelocityFn


@dataclass(frozen=True)
class VelocityCall:
    """One call of the velocity function: times ``t`` (N,), states ``x`` (N, D) and the guided velocity
    ``v`` (N, D) it returned."""

    t: torch.Tensor
    x: torch.Tensor
    v: torch.Tensor


@dataclass(frozen=True)
class TokenRecord:
    """What the sampler did for one image token (one `Sampler.sample` call).

    Args:
        noise: (N, D) the starting points.
        time_grid: (S + 1,) the grid it ran on.
        calls: every velocity call, in order (S * `evaluations_per_step` for the built-in solvers).
        sample: (N, D) the token it returned.
    """

    noise: torch.Tensor
    time_grid: torch.Tensor
    calls: list[VelocityCall] = field(default_factory=list)
    sample: torch.Tensor | None = None


class RecordingSampler(Sampler):
    """Runs ``sampler`` as it is and keeps, for every token, each velocity call it makes.

    It takes the wrapped sampler's grid (`make_time_grid`), its promised
    evaluation times (so the image head prepares the same work), its step
    noise (``stochastic``) and its ``order`` and ``evaluations_per_step``: a
    generation with the recorder gives the tokens the sampler gives alone.
    ``records`` gains one `TokenRecord` per token (generation samples the image
    tokens one at a time, all images of a call together), copied to ``device``
    as it comes; the recorder keeps everything, so record a few images, not an
    evaluation. ``clear()`` empties it.

    Args:
        sampler: the sampler to run.
        device: where the records are kept (default the CPU).
    """

    def __init__(self, sampler: Sampler, device: torch.device | str = "cpu"):
        if not isinstance(sampler, Sampler):
            raise ValueError(f"RecordingSampler records a Sampler, found {type(sampler).__name__}")
        super().__init__(None)
        self.sampler = sampler
        self.order = sampler.order
        self.evaluations_per_step = sampler.evaluations_per_step
        self.stochastic = sampler.stochastic
        self.device = torch.device(device)
        self.records: list[TokenRecord] = []

    def make_time_grid(self, num_steps: int, shift: float = 1.0, *, device=None,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.sampler.make_time_grid(num_steps, shift, device=device, dtype=dtype)

    def evaluation_times(self, time_grid: torch.Tensor) -> torch.Tensor | None:
        return self.sampler.evaluation_times(time_grid)

    def clear(self) -> None:
        """Forget every record."""
        self.records.clear()

    def sample(self, velocity_fn: VelocityFn, noise: torch.Tensor, time_grid: torch.Tensor,
               step_noise: torch.Tensor | None = None) -> torch.Tensor:
        """The wrapped sampler's ``sample``, each velocity call kept in a new `TokenRecord`."""
        def kept(tensor: torch.Tensor) -> torch.Tensor:  # a copy: a solver may update its state in place
            return tensor.detach().to(self.device, copy=True)

        calls: list[VelocityCall] = []

        def recorded(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            v = velocity_fn(x, t)
            calls.append(VelocityCall(kept(t), kept(x), kept(v)))
            return v

        start = kept(noise)
        out = self.sampler.sample(recorded, noise, time_grid, step_noise)
        self.records.append(TokenRecord(start, kept(time_grid), calls, kept(out)))
        return out
