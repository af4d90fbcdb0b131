"""The flow-matching MLP with one condition fixed: the sampling fast path.

Legend: N rows, D token dim, C condition dim, W head width, E evaluation times,
M modulation width (``3W`` per block plus ``2W`` for the output layer).

In the MLP every AdaLN modulation is a function of ``y = time_embed(t) +
cond_embed(c)`` only, never of ``x_t``. For one token the condition is fixed and
the solver visits a few known times, so all modulations of all its steps come
out of one matrix product, and each solver step runs only the x-dependent part:
the input projection, the block MLPs and the output layer. The modulation
weights are most of the head, so this also removes most of a step's weight
traffic. Work that depends only on the times (their embeddings) and on the
weights (the modulations as one linear map) is shared by all tokens of a
generation through `FlowMatchingTimes`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from einops import rearrange

if TYPE_CHECKING:
    from nextstep.heads.flow_matching import FlowMatchingMLP

#: Largest modulation table (E * N * M elements) built ahead; above it the
#: modulations are computed at every call instead.
MAX_TABLE_ELEMENTS = 1 << 25


def folded_modulation_parameters(net: "FlowMatchingMLP") -> tuple[torch.Tensor, torch.Tensor]:
    """All modulations of ``net`` as one linear map of ``SiLU(y)``: weight (M, W) and bias (M,).

    Rows are ``[shift', scale', gate]`` of each block in order, then ``[shift, 1 + scale]``
    of the output layer (see `nextstep.layers.adaln`).
    """
    parts = [block.folded_modulation_parameters() for block in net.res_blocks]
    parts.append(net.final_layer.folded_modulation_parameters())
    return torch.cat([w for w, _ in parts]), torch.cat([b for _, b in parts])


@dataclass
class FlowMatchingTimes:
    """What every token of one generation shares: the evaluation times and weight-only work.

    Valid while the head's parameters stay unchanged.

    Attributes:
        times: (E,) increasing evaluation times.
        time_embedding: (E, W) ``time_embed(times)``.
        modulation_weight: (M, W) from `folded_modulation_parameters`.
        modulation_bias: (M,).
    """

    times: torch.Tensor
    time_embedding: torch.Tensor
    modulation_weight: torch.Tensor
    modulation_bias: torch.Tensor

    @classmethod
    def build(cls, net: "FlowMatchingMLP", times: torch.Tensor) -> "FlowMatchingTimes":
        """Embed ``times`` (E,) and fold the modulation weights of ``net``."""
        times = times.to(net.input_proj.weight.device).contiguous()
        weight, bias = folded_modulation_parameters(net)
        return cls(times, net.time_embed(times), weight, bias)


@dataclass
class StepWeights:
    """The tensors of the x-dependent part of the MLP, gathered once.

    Plain tensors: module attribute lookups cost more than the small ops of a step.

    Attributes:
        input: (weight, bias) of the input projection.
        blocks: (first weight, first bias, second weight, second bias, LayerNorm eps) per block.
        output: (weight, bias) of the output layer.
        output_eps: eps of the output LayerNorm.
        width: W.
    """

    input: tuple[torch.Tensor, torch.Tensor]
    blocks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]]
    output: tuple[torch.Tensor, torch.Tensor]
    output_eps: float
    width: int

    @classmethod
    def of(cls, net: "FlowMatchingMLP") -> "StepWeights":
        """The current tensors of ``net``."""
        blocks = [(b.mlp[0].weight, b.mlp[0].bias, b.mlp[2].weight, b.mlp[2].bias, b.in_ln.eps)
                  for b in net.res_blocks]
        return cls((net.input_proj.weight, net.input_proj.bias), blocks,
                   (net.final_layer.linear.weight, net.final_layer.linear.bias),
                   net.final_layer.norm_final.eps, net.input_proj.out_features)


def sampling_step(x_t: torch.Tensor, modulation: torch.Tensor, weights: StepWeights) -> torch.Tensor:
    """The MLP from folded modulations: everything of a solver step that depends on ``x_t``.

    Args:
        x_t: (N, D) noisy tokens.
        modulation: (N, M) rows of the folded modulation table.
        weights: the MLP's tensors.

    Returns:
        (N, D) velocity.
    """
    width, norm_shape = weights.width, (weights.width,)
    # (N, M) -> pieces of (N, W); a plain view rather than einops, since this runs at every step
    pieces = modulation.view(x_t.shape[0], -1, width).unbind(1)
    h = F.linear(x_t, *weights.input)
    for number, (first_weight, first_bias, second_weight, second_bias, eps) in enumerate(weights.blocks):
        shift, scale, gate = pieces[3 * number: 3 * number + 3]
        normed = F.layer_norm(h, norm_shape, eps=eps)  # the block's affine is in scale, shift
        inner = F.linear(torch.addcmul(shift, normed, scale), first_weight, first_bias)
        h = torch.addcmul(h, gate, F.linear(F.silu(inner, inplace=True), second_weight, second_bias))
    normed = F.layer_norm(h, norm_shape, eps=weights.output_eps)
    return F.linear(torch.addcmul(pieces[-2], normed, pieces[-1]), *weights.output)


class PreparedFlowMatchingVelocity:
    """``fn(x_t, t)`` equal to ``net(x_t, t, condition)`` for a fixed condition.

    Args:
        net: the head's MLP.
        condition: (N, C).
        times: a `FlowMatchingTimes` for the times at which the function will
            be called, or None. With times the modulations of every (time, row)
            pair are tabulated now and looked up per call; without, they are
            computed per call from the precomputed condition embedding.
    """

    def __init__(self, net: "FlowMatchingMLP", condition: torch.Tensor, times: FlowMatchingTimes | None = None):
        self.net = net
        self.rows = condition.shape[0]
        self.width = net.input_proj.out_features
        self.condition_embedding = net.cond_embed(condition)  # (N, W)
        self.weights = StepWeights.of(net)
        self.pieces = 3 * len(net.res_blocks) + 2
        if times is None:
            self.modulation_weight, self.modulation_bias = folded_modulation_parameters(net)
        else:
            self.modulation_weight, self.modulation_bias = times.modulation_weight, times.modulation_bias
        self.times = None
        table_elements = None if times is None else times.times.numel() * self.rows * self.pieces * self.width
        if table_elements is not None and table_elements <= MAX_TABLE_ELEMENTS:
            self.times = times.times
            y = times.time_embedding[:, None, :] + self.condition_embedding  # (E, N, W)
            self.table = self.modulations(rearrange(y, "e n w -> (e n) w"))  # (E * N, M)
            self.row_index = torch.arange(self.rows, device=condition.device)

    def modulations(self, y: torch.Tensor) -> torch.Tensor:
        """(R, W) conditioning -> (R, M) folded modulations of every block and the output layer."""
        return torch.addmm(self.modulation_bias, F.silu(y), self.modulation_weight.t())

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t (N, D), t (N,) -> velocity (N, D)."""
        if x_t.shape[0] != self.rows:
            raise ValueError(f"x_t must have {self.rows} rows like the condition, found {tuple(x_t.shape)}")
        if self.times is not None:
            # Exact when t is one of self.times (generation holds samplers to that, `promised_times`); a
            # stray t past the last one reads the last row instead of beyond the table.
            index = torch.searchsorted(self.times, t.contiguous()).clamp_(max=self.times.numel() - 1)
            modulation = self.table.index_select(0, torch.add(self.row_index, index, alpha=self.rows))
        else:
            modulation = self.modulations(self.net.time_embed(t) + self.condition_embedding)
        return sampling_step(x_t, modulation, self.weights)
