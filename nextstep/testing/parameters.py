"""Helpers about a module's parameters for contract checks."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


def randomize(module: nn.Module, std: float = 0.1, generator: torch.Generator | None = None) -> nn.Module:
    """Redraw the parameters that are all zero (zero-initialised output layers, AdaLN gates) from
    ``N(0, std^2)``, so that every parameter influences the output; returns ``module``."""
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.numel() and parameter.abs().sum() == 0:
                draw = torch.randn(parameter.shape, generator=generator, dtype=torch.float32) * std
                parameter.copy_(draw.to(parameter.device, parameter.dtype))
    return module


def assert_every_parameter_gets_a_gradient(module: nn.Module) -> None:
    """Raise ``AssertionError`` naming each trainable parameter without a gradient, with a
    non-finite one, or with one that is all zero (after a backward pass)."""
    name = type(module).__name__
    trainable = [(key, p) for key, p in module.named_parameters() if p.requires_grad]
    missing = [key for key, p in trainable if p.grad is None]
    assert not missing, f"{name}: no gradient reaches {missing}"
    bad = [key for key, p in trainable if not torch.isfinite(p.grad).all()]
    assert not bad, f"{name}: non-finite gradient for {bad}"
    zero = [key for key, p in trainable if p.grad.abs().sum() == 0]
    assert not zero, f"{name}: zero gradient for {zero}"


def default_tolerance(dtype: torch.dtype) -> float:
    """The comparisons' tolerance (absolute and relative) for computations in ``dtype``: 1e-5 in
    float32 and wider, 2e-2 in half precision (bf16 keeps 8 bits of mantissa)."""
    return 2e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5


@contextmanager
def unchanged_random_state() -> Iterator[None]:
    """Put back the global random state (CPU and, where used, CUDA) on exit: a check's dropout draws
    leave the caller's stream of random numbers where it was."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        yield


@contextmanager
def restored(module: nn.Module) -> Iterator[nn.Module]:
    """The module, whose parameters, gradients and training mode are put back on exit."""
    state = {key: value.detach().clone() for key, value in module.state_dict(keep_vars=True).items()}
    grads = {key: None if p.grad is None else p.grad.clone() for key, p in module.named_parameters()}
    training = module.training
    try:
        yield module
    finally:
        with torch.no_grad():
            for key, value in module.state_dict(keep_vars=True).items():
                value.copy_(state[key])
        for key, p in module.named_parameters():
            p.grad = grads[key]
        module.train(training)
