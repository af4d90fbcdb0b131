"""Choosing between a Triton kernel and its reference, and falling back when a kernel fails."""

import pytest
import torch

from nextstep.kernels import triton_support
from nextstep.kernels.triton_support import KernelFallbackWarning, block_size, dispatch


def test_a_failing_kernel_warns_once_and_the_reference_takes_over(monkeypatch):
    monkeypatch.setattr(triton_support, "FAILED_KERNELS", {})
    monkeypatch.setattr(triton_support, "triton_enabled", lambda tensor: True)
    calls = []

    def kernel(x):
        calls.append(1)
        raise RuntimeError("no GPU compiler here")

    x = torch.ones(3)
    with pytest.warns(KernelFallbackWarning, match="the Triton kernel of doubling failed .*no GPU compiler"):
        assert torch.equal(dispatch("doubling", x, kernel, lambda t: 2 * t, x), 2 * x)
    assert torch.equal(dispatch("doubling", x, kernel, lambda t: 2 * t, x), 2 * x)
    assert calls == [1] and "doubling" in triton_support.FAILED_KERNELS


def test_argument_errors_are_raised_not_swallowed(monkeypatch):
    monkeypatch.setattr(triton_support, "FAILED_KERNELS", {})
    monkeypatch.setattr(triton_support, "triton_enabled", lambda tensor: True)

    def kernel(x):
        raise ValueError("x must have shape (N, W)")

    with pytest.raises(ValueError, match="must have shape"):
        dispatch("checked", torch.ones(1), kernel, lambda t: t, torch.ones(1))
    assert not triton_support.FAILED_KERNELS


def test_references_run_where_kernels_cannot(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not triton_support.triton_enabled(torch.ones(1))
    monkeypatch.setenv("NEXTSTEP_DISABLE_TRITON", "1")
    assert triton_support.triton_disabled() and not triton_support.triton_enabled(torch.ones(1))


def test_block_size():
    assert [block_size(n) for n in (1, 2, 3, 64, 65)] == [1, 2, 4, 64, 128]
    with pytest.raises(ValueError, match="rows of 70000 elements exceed this kernel's limit of 65536"):
        block_size(70000)
