"""One image token's work after the backbone, over static buffers (what the fast path captures).

Legend: G guidance branches, R images, N = G * R backbone rows, H hidden size,
D token dim, S solver steps, E evaluation times, K solver stages.

Given the backbone's last hidden state of every row, a token step computes::

    condition = image_out_projector(hidden)                  # (N, H)
    x         = integrate the guided head velocity from noise  # (R, D), all solver stages
    token     = LayerNorm(x) if use_norm else x               # (R, D), float32
    embeds    = image_in_projector(token), once per branch     # (N, 1, H), the next backbone input

`FusedTokenStep` runs it as a fixed sequence of kernels (flow-matching head,
planned sampler, weighted guidance), which `nextstep.fast.cuda_graph.CapturedCall`
records as one CUDA graph; its numbers (time embeddings, stage coefficients,
branch weights) live in small static tables rewritten between replays.
`GenericTokenStep` runs any head, sampler and guidance through their own
``prepare`` / ``sample`` / ``combine``, eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from nextstep.fast.flow_head_velocity import FusedFlowMatchingVelocity
from nextstep.fast.solver_plan import NOISE, STATE, TRIAL, VELOCITY, SolverPlan
from nextstep.kernels import guided_update
from nextstep.kernels.triton_support import kernel_function
from nextstep.samplers.guidance import GuidedVelocity
from nextstep.samplers.promised_times import sample_checking_promise

if TYPE_CHECKING:
    from nextstep.model import NextStep
    from nextstep.samplers.base import Sampler
    from nextstep.samplers.guidance import Guidance

__all__ = ["FusedTokenStep", "GenericTokenStep", "TokenStepBuffers"]

#: Largest modulation table (E * N * P * W elements) a fused step holds; above it
#: the modulations are computed per stage instead of per token.
MAX_TABLE_ELEMENTS = 1 << 28


@dataclass
class TokenStepBuffers:
    """The tensors a token step shares with the backbone's decode step.

    Attributes:
        hidden: (N, H) last hidden state of every row: the token step's input,
            the decode step's output.
        embeds: (N, 1, H) embedding of the sampled token for every row: the
            token step's output, the decode step's input.
        token: (R, D) float32 sampled token (after ``use_norm``).
    """

    hidden: torch.Tensor
    embeds: torch.Tensor
    token: torch.Tensor

    @classmethod
    def allocate(cls, rows: int, branches: int, hidden_size: int, token_dim: int, *,
                 device: torch.device, dtype: torch.dtype) -> "TokenStepBuffers":
        """Zeroed buffers for ``branches * rows`` backbone rows."""
        with torch.inference_mode(False):
            return cls(torch.zeros(branches * rows, hidden_size, device=device, dtype=dtype),
                       torch.zeros(branches * rows, 1, hidden_size, device=device, dtype=dtype),
                       torch.zeros(rows, token_dim, device=device, dtype=torch.float32))


def _write_outputs(model, buffers: TokenStepBuffers, token: torch.Tensor, use_norm: bool, branches: int) -> None:
    """use_norm, the token output, the in-projection for every branch."""
    if use_norm:
        token = F.layer_norm(token, token.shape[-1:], eps=1e-6)
    buffers.token.copy_(token)
    dtype = buffers.embeds.dtype
    embeds = model.image_in_projector(token.to(dtype))  # (R, H)
    rows = embeds.shape[0]
    buffers.embeds.view(branches, rows, -1).copy_(embeds[None].expand(branches, -1, -1))


class FusedTokenStep:
    """The token step of a `FlowMatchingHead` with a planned sampler and weighted guidance.

    Args:
        model: the `nextstep.model.NextStep` (its projectors are used).
        velocity: the head in fused form.
        plan: the sampler's stages for this step count (numbers may change later
            through `set_plan`, the structure may not).
        rows: R.
        branches: G.
        buffers: shared with the decode step.
        use_norm: LayerNorm each sampled token.
        use_kernels: None: Triton kernels where they can run; True/False: always/never
            (``NEXTSTEP_DISABLE_TRITON=1`` makes it False).
        max_table_elements: largest per-token modulation table.

    Attributes:
        noise: (R, D) float32 starting noise of the token (input).
        step_noise: (max(1, noise_steps), R, D) float32 step noise (input).
        weights: (E, G) float32 branch weights per evaluation time (input).
    """

    def __init__(self, model: "NextStep", velocity: FusedFlowMatchingVelocity, plan: SolverPlan, *, rows: int,
                 branches: int, buffers: TokenStepBuffers, use_norm: bool, use_kernels: bool | None = None,
                 max_table_elements: int = MAX_TABLE_ELEMENTS):
        self.model = model
        self.velocity = velocity
        self.signature = plan.signature
        self.stages = plan.stages
        self.rows, self.branches = rows, branches
        self.buffers = buffers
        self.use_norm = use_norm
        self.update = kernel_function(guided_update, use_kernels)
        device = buffers.hidden.device
        evaluations = plan.times.shape[0]
        token_dim = buffers.token.shape[1]
        table = evaluations * branches * rows * velocity.pieces * velocity.width
        self.tabulate = table <= max_table_elements
        with torch.inference_mode(False):
            self.time_embedding = torch.zeros(evaluations, velocity.width, device=device, dtype=velocity.dtype)
            self.coefficients = torch.zeros(len(plan.stages), 3, device=device)
            self.weights = torch.zeros(evaluations, branches, device=device)
            self.noise = torch.zeros(rows, token_dim, device=device)
            self.step_noise = torch.zeros(max(1, plan.noise_steps), rows, token_dim, device=device)
        self._numbers: tuple | None = None
        self.set_plan(plan)

    @torch.no_grad()
    def set_plan(self, plan: SolverPlan) -> None:
        """Write a plan's numbers (same structure) into the static tables; a no-op when unchanged."""
        if plan.signature != self.signature:
            raise ValueError("a fused token step keeps its plan's structure; build a new step for another one")
        numbers = (plan.times.tolist(), plan.coefficients.tolist())
        if numbers == self._numbers:
            return
        self.time_embedding.copy_(self.velocity.time_embedding(plan.times))
        self.coefficients.copy_(plan.coefficients)
        self._numbers = numbers

    @torch.no_grad()
    def load(self, noise: torch.Tensor, step_noise: torch.Tensor | None, weights: torch.Tensor) -> None:
        """Copy one token's inputs into the static buffers (device-to-device copies, no synchronisation).

        Args:
            noise: (R, D) starting noise.
            step_noise: (>= noise_steps, R, D) step noise of a stochastic plan, or None.
            weights: (E, G) branch weights.
        """
        self.noise.copy_(noise)
        if step_noise is not None and self.signature[2]:
            self.step_noise.copy_(step_noise[: self.step_noise.shape[0]])
        self.weights.copy_(weights)

    def compute(self) -> None:
        """The whole token step: reads ``buffers.hidden`` and the inputs, writes ``buffers.token`` / ``.embeds``."""
        model, velocity, update = self.model, self.velocity, self.update
        branches = self.branches
        condition = model.image_out_projector(self.buffers.hidden)  # (N, H)
        condition_embedding = velocity.condition_embedding(condition)  # (N, W)
        table = velocity.modulations(self.time_embedding, condition_embedding) if self.tabulate else None
        dtype = velocity.dtype
        state = self.noise.clone()  # (R, D) float32
        trial = torch.empty_like(state) if any(s.target == TRIAL for s in self.stages) else None
        kept = torch.empty_like(state) if any(s.keep_velocity for s in self.stages) else None
        for number, stage in enumerate(self.stages):
            source = state if stage.source == STATE else trial
            x_t = source.to(dtype).repeat(branches, 1)  # (N, D), branch-major like the conditions
            if table is not None:
                modulation = table[stage.time_index]
            else:
                modulation = velocity.modulations(self.time_embedding[stage.time_index: stage.time_index + 1],
                                                  condition_embedding)[0]
            predictions = velocity(x_t, modulation)  # (N, D)
            extra = None
            if stage.extra == NOISE:
                extra = self.step_noise[stage.noise_index]
            elif stage.extra == VELOCITY:
                extra = kept
            update(predictions, state, self.weights[stage.time_index], self.coefficients[number], extra,
                   out=state if stage.target == STATE else trial,
                   velocity_out=kept if stage.keep_velocity else None)
        _write_outputs(model, self.buffers, state, self.use_norm, branches)


class GenericTokenStep:
    """The token step through the head's, sampler's and guidance's own code (eager, any component).

    Args:
        model: the `nextstep.model.NextStep`.
        sampler: any sampler.
        guidance: any guidance.
        rows: R.
        buffers: shared with the decode step.
        use_norm: LayerNorm each sampled token.
    """

    def __init__(self, model: "NextStep", sampler: "Sampler", guidance: "Guidance", *, rows: int,
                 buffers: TokenStepBuffers, use_norm: bool):
        self.model, self.sampler, self.guidance = model, sampler, guidance
        self.rows, self.branches = rows, guidance.num_branches
        self.buffers = buffers
        self.use_norm = use_norm

    def compute(self, noise: torch.Tensor, grid: torch.Tensor, times: Any, step_noise: torch.Tensor | None,
                progress: float, promised: torch.Tensor | None = None) -> None:
        """Sample one token.

        Args:
            noise: (R, D) starting noise.
            grid: (S + 1,) time grid.
            times: the head's prepared evaluation times, or None.
            step_noise: (S, R, D) or None.
            progress: the token's position in its image.
            promised: the sampler's evaluation times to hold it to on this token
                (`nextstep.samplers.promised_times`), or None.
        """
        conditions = self.model.image_out_projector(self.buffers.hidden).view(self.branches, self.rows, -1)
        velocity = GuidedVelocity(self.model.image_head, conditions, self.guidance, times=times, progress=progress)
        token = sample_checking_promise(self.sampler, velocity, noise, grid, step_noise, promised)
        _write_outputs(self.model, self.buffers, token, self.use_norm, self.branches)
