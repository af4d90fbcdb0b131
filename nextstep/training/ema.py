"""An exponential moving average of a model's trainable parameters."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


class ExponentialMovingAverage:
    """Keeps ``shadow = decay * shadow + (1 - decay) * parameter`` after every optimiser step.

    Only trainable parameters are averaged; the average starts equal to the
    weights it is created from. Under FSDP the averaged tensors are sharded
    like the parameters they follow.

    Args:
        model: the (unwrapped) model whose parameters are averaged.
        decay: in [0, 1); larger is smoother.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), found {decay!r}")
        self.decay = decay
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        parameters = dict(model.named_parameters())
        self.shadow = {name: parameters[name].detach().clone().float() for name in self.names}

    @classmethod
    def holding(cls, model: nn.Module, state: dict[str, torch.Tensor]) -> "ExponentialMovingAverage":
        """An average over ``model``'s trainable parameters that holds ``state`` (as `load_state_dict`)."""
        average = cls(model, decay=0.0)
        average.load_state_dict(state)
        return average

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards the current weights of ``model``."""
        parameters = dict(model.named_parameters())
        for name in self.names:
            self.shadow[name].lerp_(parameters[name].detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged tensors by parameter name (float32)."""
        return dict(self.shadow)

    def check_state(self, state: dict[str, torch.Tensor]) -> None:
        """Raise ``ValueError`` unless ``state`` holds exactly this average's names, each of its shape (the
        whole shape, for averages sharded by FSDP)."""
        missing = sorted(set(self.names) - set(state))
        unexpected = sorted(set(state) - set(self.names))
        if missing or unexpected:
            raise ValueError(
                f"EMA state does not match the model: missing {missing}, unexpected {unexpected}"
            )
        for name in self.names:
            if tuple(state[name].shape) != tuple(self.shadow[name].shape):
                raise ValueError(
                    f"EMA tensor {name} has shape {tuple(state[name].shape)}, "
                    f"expected {tuple(self.shadow[name].shape)}"
                )

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore averages saved by `state_dict`; names and shapes must match (`check_state`)."""
        self.check_state(state)
        for name in self.names:
            self.shadow[name].copy_(state[name])

    @contextmanager
    def applied_to(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the averaged weights into ``model`` (restored on exit)."""
        parameters = dict(model.named_parameters())
        saved = {name: parameters[name].detach().clone() for name in self.names}
        with torch.no_grad():
            for name in self.names:
                parameters[name].copy_(self.shadow[name].to(parameters[name].dtype))
        try:
            yield model
        finally:
            with torch.no_grad():
                for name in self.names:
                    parameters[name].copy_(saved[name])
