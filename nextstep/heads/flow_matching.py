"""The per-token MLP flow-matching head with AdaLN conditioning.

Parameter names follow the NextStep-1 release (``net.input_proj``,
``net.res_blocks.{i}.adaLN_modulation.1`` ...).

Legend: N tokens, D token dim, C condition dim, W width, E evaluation times.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from nextstep.config import Config, require
from nextstep.heads.base import ImageHead
from nextstep.heads.prepared_flow_matching import FlowMatchingTimes, PreparedFlowMatchingVelocity
from nextstep.heads.time_sampling import TIME_SAMPLINGS, sample_times
from nextstep.layers import AdaLNFinalLayer, AdaLNResBlock, TimestepEmbedder
from nextstep.registry import register_component


@dataclass
class FlowMatchingHeadConfig(Config):
    """Shape and training loss settings of `FlowMatchingHead`.

    Args:
        token_dim: D, width of an image token (64 for f8 x 16 channels x 2x2 patches).
        condition_dim: C, width of the backbone condition.
        width: MLP width.
        depth: number of AdaLN residual blocks.
        mlp_ratio: hidden width of each block's MLP relative to ``width``.
        frequency_dim: size of the sinusoidal time code.
        batch_mul: repeats of each target with fresh (t, noise) in the loss.
        time_sampling: ``logit_normal`` or ``uniform``.
        time_mean: mean of the normal inside the logit-normal.
        time_std: standard deviation of the normal inside the logit-normal.
        time_shift: shift applied to the training times (1: none, as in NextStep-1).
    """

    token_dim: int = 64
    condition_dim: int = 5120
    width: int = 1536
    depth: int = 12
    mlp_ratio: float = 1.0
    frequency_dim: int = 256
    batch_mul: int = 4
    time_sampling: str = "logit_normal"
    time_mean: float = 0.0
    time_std: float = 1.0
    time_shift: float = 1.0

    def validate(self) -> None:
        for name in ("token_dim", "condition_dim", "width", "depth", "frequency_dim", "batch_mul"):
            require(getattr(self, name) >= 1, name, getattr(self, name), ">= 1")
        require(self.mlp_ratio > 0 and int(self.width * self.mlp_ratio) >= 1, "mlp_ratio", self.mlp_ratio,
                f"positive, with a hidden width int(width * mlp_ratio) of at least 1 (width {self.width})")
        require(self.time_sampling in TIME_SAMPLINGS, "time_sampling", self.time_sampling,
                f"one of {list(TIME_SAMPLINGS)}")
        require(self.time_std > 0, "time_std", self.time_std, "positive")
        require(self.time_shift > 0, "time_shift", self.time_shift, "positive")


class FlowMatchingMLP(nn.Module):
    """``(x_t, t, c) -> v``: input projection, AdaLN residual MLP blocks, AdaLN output layer."""

    def __init__(self, config: FlowMatchingHeadConfig):
        super().__init__()
        self.input_proj = nn.Linear(config.token_dim, config.width)
        self.time_embed = TimestepEmbedder(config.width, config.frequency_dim)
        self.cond_embed = nn.Linear(config.condition_dim, config.width)
        self.res_blocks = nn.ModuleList(
            AdaLNResBlock(config.width, config.mlp_ratio) for _ in range(config.depth)
        )
        self.final_layer = AdaLNFinalLayer(config.width, config.token_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier Linears, N(0, 0.02) time MLP, zero AdaLN outputs and output layer."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for layer in (self.time_embed.mlp[0], self.time_embed.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        for block in self.res_blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """x_t (N, D), t (N,), condition (N, C) -> velocity (N, D)."""
        x = self.input_proj(x_t)
        y = self.time_embed(t) + self.cond_embed(condition)
        for block in self.res_blocks:
            x = block(x, y)
        return self.final_layer(x, y)


@register_component("image_head", "flow_matching")
class FlowMatchingHead(ImageHead):
    """MLP flow-matching head: predicts ``x1 - x0`` for one token at a time."""

    config_class = FlowMatchingHeadConfig

    def __init__(self, config: FlowMatchingHeadConfig | None = None):
        super().__init__()
        self.config = config or FlowMatchingHeadConfig()
        self.net = FlowMatchingMLP(self.config)

    @property
    def token_dim(self) -> int:
        return self.config.token_dim

    @property
    def condition_dim(self) -> int:
        return self.config.condition_dim

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """x_t (N, D), t (N,), condition (N, C) -> velocity (N, D).

        Raises:
            ValueError: naming the expected and the found shapes, unless x_t is (N, D), t a tensor
                of shape (N,) and condition (N, C); naming the dtypes when x_t or condition is not in
                the head's (outside autocast).
        """
        for name, value in (("x_t", x_t), ("condition", condition)):
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{name} must be a torch.Tensor, found {type(value).__name__}")
        if (not isinstance(t, torch.Tensor) or x_t.ndim != 2 or x_t.shape[-1] != self.token_dim
                or t.shape != x_t.shape[:1]):
            found = tuple(t.shape) if isinstance(t, torch.Tensor) else f"a {type(t).__name__}"
            raise ValueError(f"x_t must have shape (N, {self.token_dim}) and t shape (N,), one time per token, found "
                             f"{tuple(x_t.shape)} and {found}")
        if condition.shape != (x_t.shape[0], self.condition_dim):
            raise ValueError(f"condition must have shape ({x_t.shape[0]}, {self.condition_dim}), one row per token of "
                             f"x_t, found {tuple(condition.shape)}")
        try:
            return self.net(x_t, t, condition)
        except RuntimeError:
            weights = next(self.parameters()).dtype
            if {x_t.dtype, condition.dtype} != {weights}:
                raise ValueError(f"x_t and condition must be in the head's dtype {weights} (or under autocast), "
                                 f"found {x_t.dtype} and {condition.dtype}") from None
            raise

    def _net_is_the_mlp(self) -> bool:
        """Whether ``net`` is a `FlowMatchingMLP` with its own forward and modules (which `prepare_net`
        folds)."""
        return self._unfolded_part() is None

    def _unfolded_part(self) -> str | None:
        """None when ``net`` is a `FlowMatchingMLP` with its own forward, whose blocks, projections and
        output layer are the stock modules that prepared evaluation computes itself; else the first part
        that is not (a subclass, another activation, another layout of a block)."""
        net = getattr(self, "net", None)
        if not isinstance(net, FlowMatchingMLP) or type(net).forward is not FlowMatchingMLP.forward:
            return "net"

        def stock(module: nn.Module, *layout: type) -> bool:  # exactly these classes, in this order
            children = list(module.children())
            return len(children) == len(layout) and all(type(c) is kind for c, kind in zip(children, layout))

        parts = [("input_proj", type(net.input_proj) is nn.Linear), ("cond_embed", type(net.cond_embed) is nn.Linear)]
        for index, block in enumerate(net.res_blocks):
            name = f"res_blocks.{index}"
            parts += [(name, type(block) is AdaLNResBlock),
                      (f"{name}.in_ln", type(block.in_ln) is nn.LayerNorm and block.in_ln.elementwise_affine),
                      (f"{name}.mlp", stock(block.mlp, nn.Linear, nn.SiLU, nn.Linear)),
                      (f"{name}.adaLN_modulation", stock(block.adaLN_modulation, nn.SiLU, nn.Linear))]
        final = net.final_layer
        parts += [("final_layer", type(final) is AdaLNFinalLayer),
                  ("final_layer.norm_final", type(final.norm_final) is nn.LayerNorm
                   and not final.norm_final.elementwise_affine),
                  ("final_layer.linear", type(final.linear) is nn.Linear),
                  ("final_layer.adaLN_modulation", stock(final.adaLN_modulation, nn.SiLU, nn.Linear))]
        return next((f"net.{name}" for name, same in parts if not same), None)

    def own_velocity_reason(self) -> str | None:
        """None when the velocity is this class's MLP (which `prepare` folds and the fast
        path fuses), else why not: a subclass that overrides `velocity`, or whose ``net``
        is not a `FlowMatchingMLP` with its own forward, is evaluated through `velocity`; one that
        overrides how a velocity is prepared (`prepare`, `prepare_net`, `prepare_times`) through
        those."""
        part = self._unfolded_part()
        if part == "net":
            return f"{type(self).__name__}'s net is not a FlowMatchingMLP with that class's own forward"
        if part is not None:
            return (f"{type(self).__name__}'s {part} is not the stock module of a FlowMatchingMLP (a subclass, "
                    "another activation or layout), which prepared evaluation would compute in its place")
        return self._overridden_method()

    def _overridden_method(self) -> str | None:
        """Why the velocity is not this class's MLP as far as the class's own methods go (a subclass that
        overrides how a velocity is computed or prepared), or None."""
        for name in ("velocity", "prepare", "prepare_net", "prepare_times"):
            if getattr(type(self), name) is not getattr(FlowMatchingHead, name):
                return f"{type(self).__name__} overrides the {name} of FlowMatchingHead"
        return None

    def prepare_times(self, times: torch.Tensor) -> FlowMatchingTimes | torch.Tensor:
        """Time embeddings of ``times`` (E,) and the folded modulation weights, shared by all tokens
        (``times`` unchanged where ``net`` is not a `FlowMatchingMLP` of its own forward)."""
        if not self._net_is_the_mlp():
            return super().prepare_times(times)
        return FlowMatchingTimes.build(self.net, times)

    def prepare_net(
        self, condition: torch.Tensor, times: torch.Tensor | FlowMatchingTimes | None = None
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``fn(x_t (N, D), t (N,)) -> (N, D)``, equal to ``net(x_t, t, condition)`` for one condition
        (N, C), folded where ``net`` is the MLP (see `PreparedFlowMatchingVelocity`): what `prepare`
        returns for this class, and the fast network call for a subclass that turns the network's
        output into a velocity of its own.

        Args:
            condition: (N, C).
            times: (E,) the only times the function will be called at (or their
                `prepare_times`), or None.
        """
        self.check_shapes(condition=condition)
        # Prepared times were built for the stock MLP (`prepare_times`, once per generation): no check per token.
        if not isinstance(times, FlowMatchingTimes) and not self._net_is_the_mlp():
            return lambda x_t, t: self.net(x_t, t, condition)
        return self._folded(condition, times)

    def _folded(self, condition: torch.Tensor, times: torch.Tensor | FlowMatchingTimes | None):
        """`PreparedFlowMatchingVelocity` of ``condition``, for a ``net`` known to be the stock MLP."""
        if isinstance(times, torch.Tensor):
            times = FlowMatchingTimes.build(self.net, times)
        return PreparedFlowMatchingVelocity(self.net, condition, times)

    def prepare(
        self, condition: torch.Tensor, times: torch.Tensor | FlowMatchingTimes | None = None
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """A fast velocity function for one condition (N, C): `prepare_net`, or, for a subclass
        whose velocity is another (`own_velocity_reason`), its `velocity` bound to the condition.

        Args:
            condition: (N, C).
            times: (E,) the only times the function will be called at (or their
                `prepare_times`), or None.
        """
        # The modules' check is prepare_times's where times come prepared (once per generation, not per token).
        prepared = isinstance(times, FlowMatchingTimes)
        self.check_shapes(condition=condition)
        if (self._overridden_method() if prepared else self.own_velocity_reason()) is not None:
            return super().prepare(condition, times)
        return self._folded(condition, times)

    def loss(
        self, target: torch.Tensor, condition: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """target (N, D), condition (N, C) -> per-token loss (N,), float32.

        Each token is repeated ``batch_mul`` times with independent (t, noise);
        the squared error is averaged over features and repeats.
        """
        self.check_shapes(target=target, condition=condition)
        repeats = self.config.batch_mul
        count = target.shape[0]
        x1 = target.float().repeat(repeats, 1)
        condition = condition.repeat(repeats, 1)
        t = sample_times(
            x1.shape[0], self.config.time_sampling, mean=self.config.time_mean,
            std=self.config.time_std, shift=self.config.time_shift, generator=generator,
            device=x1.device,
        )
        x0 = torch.randn(x1.shape, generator=generator, device=x1.device)
        per_token = self.flow_error(x1, condition, t, x0)  # (repeats * N,)
        return per_token.view(repeats, count).mean(0)
