"""The flow-matching head's MLP as the fused token step runs it.

Legend: N rows (branches x images), D token dim, C condition dim, W head width,
E evaluation times, P modulation pieces (3 per block + 2 for the output layer).

Same arithmetic as `nextstep.heads.prepared_flow_matching.PreparedFlowMatchingVelocity`
(every modulation of every evaluation time from one matrix product per token,
the LayerNorm affines folded into them), with two differences for graph
capture: the modulation row of a stage is picked by a fixed time index instead
of a search over times, and each block's LayerNorm + modulation is one fused
kernel (`nextstep.kernels.adaln_modulation.layer_norm_modulate`). With
``fused_blocks`` each block is two kernels instead of five: the modulated
first product with its SiLU, and the second product with its gated residual
(`nextstep.kernels.adaln_linear`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from nextstep.heads.base import ImageHead
from nextstep.heads.flow_matching import FlowMatchingHead
from nextstep.heads.prepared_flow_matching import folded_modulation_parameters
from nextstep.kernels import gated_linear, layer_norm_modulate, modulated_linear
from nextstep.kernels.persistent_head import (
    BARRIER_POLLING,
    PersistentHeadWeights,
    persistent_head_triton,
    persistent_programs,
)
from nextstep.kernels.persistent_head import MAX_ROWS as PERSISTENT_MAX_ROWS
from nextstep.kernels.triton_support import dispatch, interpreter_enabled, kernel_choice, kernel_function

__all__ = ["FusedFlowMatchingVelocity", "fused_head_reason"]


def fused_head_reason(head: ImageHead) -> str | None:
    """None when the fused token step can run ``head``, else why not."""
    if not isinstance(head, FlowMatchingHead):
        return f"{type(head).__name__} is not a FlowMatchingHead"
    return head.own_velocity_reason()


class FusedFlowMatchingVelocity:
    """``velocity(x_t, modulation) -> v`` of a `FlowMatchingHead`, with modulations tabulated per token.

    Holds the folded modulation weights (one (P * W, W) matrix); valid while the
    head's parameters stay unchanged.

    Args:
        head: the head.
        use_kernels: None picks the Triton kernel where it can run; True always
            uses it; False always uses the eager reference.
        fused_blocks: run each AdaLN block as two fused matrix-product kernels
            instead of cuBLAS products around fused norms.
        persistent: run a whole evaluation as one launch of cooperating programs
            (`nextstep.kernels.persistent_head`) where Triton runs and the head
            allows it (one LayerNorm epsilon for all blocks, at most 16 rows);
            ``programs`` of them (default: `persistent_programs`; 1 under Triton's interpreter).
        prefetch: in the one-launch evaluation, each program asks L2 for its
            weights of the next product while it computes the current one.
        barrier_polling: in the one-launch evaluation, how the programs wait
            at the grid-wide barrier (a name of
            `nextstep.kernels.persistent_head.BARRIER_POLLING`).
    """

    def __init__(self, head: FlowMatchingHead, use_kernels: bool | None = None, fused_blocks: bool = False,
                 persistent: bool = False, programs: int | None = None, prefetch: bool = True,
                 barrier_polling: str = "relaxed"):
        reason = fused_head_reason(head)
        if reason is not None:
            raise ValueError(reason)
        if barrier_polling not in BARRIER_POLLING:
            raise ValueError(f"barrier_polling must be one of {list(BARRIER_POLLING)}, found {barrier_polling!r}")
        net = head.net
        self.net = net
        self.width = net.input_proj.out_features
        self.pieces = 3 * len(net.res_blocks) + 2
        with torch.no_grad():
            weight, bias = folded_modulation_parameters(net)
            self.modulation_weight, self.modulation_bias = weight.detach().clone(), bias.detach().clone()
        self.input_weights = (net.input_proj.weight, net.input_proj.bias)
        self.block_weights = [(b.mlp[0].weight, b.mlp[0].bias, b.mlp[2].weight, b.mlp[2].bias, b.in_ln.eps)
                              for b in net.res_blocks]
        self.output_weights = (net.final_layer.linear.weight, net.final_layer.linear.bias)
        self.output_eps = net.final_layer.norm_final.eps
        self.condition_weights = (net.cond_embed.weight, net.cond_embed.bias)
        self.fused_blocks = fused_blocks
        self.use_kernels = use_kernels = kernel_choice(use_kernels)
        # The one-launch kernel takes one LayerNorm epsilon for all blocks, and runs only with kernels on.
        self.persistent = (persistent and use_kernels is not False
                           and len({eps for *_, eps in self.block_weights}) == 1)
        self.programs = programs
        self.prefetch = prefetch
        self.barrier_polling = barrier_polling
        self._persistent_weights: PersistentHeadWeights | None = None
        self.layer_norm_modulate = kernel_function(layer_norm_modulate, use_kernels)
        self.modulated_linear = kernel_function(modulated_linear, use_kernels)
        self.gated_linear = kernel_function(gated_linear, use_kernels)

    @property
    def dtype(self) -> torch.dtype:
        return self.modulation_weight.dtype

    def time_embedding(self, times: torch.Tensor) -> torch.Tensor:
        """(E,) times -> (E, W) embeddings (weight-only work, once per time grid)."""
        return self.net.time_embed(times.to(self.modulation_weight.device))

    def condition_embedding(self, condition: torch.Tensor) -> torch.Tensor:
        """(N, C) conditions -> (N, W)."""
        return F.linear(condition, *self.condition_weights)

    def modulations(self, time_embedding: torch.Tensor, condition_embedding: torch.Tensor) -> torch.Tensor:
        """Every modulation of every (time, row) pair.

        Args:
            time_embedding: (E, W).
            condition_embedding: (N, W).

        Returns:
            (E, N, P, W): pieces ``[shift', scale', gate]`` per block, then ``[shift, scale]``.
        """
        y = F.silu(time_embedding[:, None, :] + condition_embedding[None])  # (E, N, W)
        table = torch.addmm(self.modulation_bias, rearrange(y, "e n w -> (e n) w"), self.modulation_weight.t())
        return rearrange(table, "(e n) (p w) -> e n p w", e=time_embedding.shape[0], p=self.pieces)

    def __call__(self, x_t: torch.Tensor, modulation: torch.Tensor) -> torch.Tensor:
        """Velocity at one evaluation time.

        Args:
            x_t: (N, D) noisy tokens in the head's dtype.
            modulation: (N, P, W), one time's slice of `modulations`.

        Returns:
            (N, D) velocity in the head's dtype.
        """
        if self.persistent and x_t.shape[0] <= PERSISTENT_MAX_ROWS:
            if self.use_kernels:
                return self._persistent(x_t, modulation)
            return dispatch("persistent_head", x_t, self._persistent, self._separate, x_t, modulation)
        return self._separate(x_t, modulation)

    def _separate(self, x_t: torch.Tensor, modulation: torch.Tensor) -> torch.Tensor:
        """`__call__` as separate kernels per product (the fused-block or the norm-kernel form)."""
        h = F.linear(x_t, *self.input_weights)
        if self.fused_blocks:
            for number, (first_weight, first_bias, second_weight, second_bias, eps) in enumerate(
                    self.block_weights):
                shift, scale, gate = modulation[:, 3 * number: 3 * number + 3].unbind(1)  # (N, W) each
                inner = self.modulated_linear(h, shift, scale, first_weight, first_bias, eps, True)
                h = self.gated_linear(inner, second_weight, second_bias, gate, h)
            return self.modulated_linear(h, modulation[:, -2], modulation[:, -1], *self.output_weights,
                                         self.output_eps, False)
        norm = self.layer_norm_modulate
        for number, (first_weight, first_bias, second_weight, second_bias, eps) in enumerate(self.block_weights):
            shift, scale, gate = modulation[:, 3 * number: 3 * number + 3].unbind(1)  # (N, W) each
            inner = F.linear(norm(h, shift, scale, eps), first_weight, first_bias)
            h = torch.addcmul(h, gate, F.linear(F.silu(inner, inplace=True), second_weight, second_bias))
        modulated = norm(h, modulation[:, -2], modulation[:, -1], self.output_eps)
        return F.linear(modulated, *self.output_weights)

    def _persistent(self, x_t: torch.Tensor, modulation: torch.Tensor) -> torch.Tensor:
        """`__call__` as one launch of cooperating programs (weights stacked and programs counted once)."""
        if self._persistent_weights is None:
            firsts, first_biases, seconds, second_biases, eps = zip(*self.block_weights)
            self._persistent_weights = PersistentHeadWeights(
                *self.input_weights, firsts, first_biases, seconds, second_biases, *self.output_weights, eps[0],
                self.output_eps)
            if self.programs is None:
                if interpreter_enabled():
                    self.programs = 1
                else:
                    multiprocessors = (torch.cuda.get_device_properties(x_t.device).multi_processor_count
                                       if x_t.device.type == "cuda" else None)
                    self.programs = persistent_programs(max(self.width, self._persistent_weights.inner_width),
                                                        multiprocessors)
        return persistent_head_triton(x_t, modulation, self._persistent_weights, self.programs, prefetch=self.prefetch,
                                      polling=self.barrier_polling)
