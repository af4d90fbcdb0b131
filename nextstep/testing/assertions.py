"""Assertions the contract checks share: closeness and refusals, named by component and property."""

from __future__ import annotations

from typing import Callable

import torch


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float, message: str) -> None:
    """`torch.testing.assert_close` with ``tolerance`` absolute and relative; its failure starts with ``message``."""
    try:
        torch.testing.assert_close(actual, expected, atol=tolerance, rtol=tolerance)
    except AssertionError as error:
        raise AssertionError(f"{message}: {error}") from None


def refuses(call: Callable[[], object], what: str, owner: str) -> None:
    """Raise ``AssertionError`` unless ``call()`` raises ``ValueError`` (``what`` names the bad input)."""
    try:
        call()
    except ValueError:
        return
    except Exception as error:  # the wrong kind of error: say which
        raise AssertionError(f"{owner}: {what} should raise ValueError naming what was expected and found, "
                             f"raised {type(error).__name__}: {error}") from error
    raise AssertionError(f"{owner}: {what} should raise ValueError, and was accepted")


def assert_finite(tensor: torch.Tensor, what: str) -> None:
    """Raise ``AssertionError`` counting the NaN and infinite values of ``tensor`` (``what`` names it)."""
    assert bool(torch.isfinite(tensor).all()), (
        f"{what} is not finite: {int(torch.isnan(tensor).sum())} NaN and {int(torch.isinf(tensor).sum())} "
        f"infinite of {tensor.numel()} values")
