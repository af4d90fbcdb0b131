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


def test_an_interpreter_that_cannot_run_with_this_numpy_is_named():
    from nextstep.kernels.triton_support import interpreter_problem

    problem = interpreter_problem("3.6.0", "2.4.6")
    assert problem == ("Triton 3.6.0's interpreter cannot run the kernels with NumPy 2.4.6 (it needs NumPy < 2.4, "
                       "or Triton >= 3.7)")
    assert interpreter_problem("3.5.1+git9f2a", "2.5.0rc1") is not None
    assert interpreter_problem("3.6.0", "2.3.5") is None
    assert interpreter_problem("3.7.0", "2.4.6") is None
    assert interpreter_problem("3.9.0", "2.5.2") is None


def test_an_interpreter_that_cannot_run_leaves_the_references(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton_support, "interpreter_problem", lambda: "Triton 3.6.0's interpreter cannot run")
    monkeypatch.setattr(triton_support, "_import_triton", lambda: object())
    triton_support._warn_once.cache_clear()
    with pytest.warns(KernelFallbackWarning, match="cannot run; the kernels' PyTorch references run instead"):
        assert not triton_support.interpreter_active()
    assert not triton_support.triton_enabled(torch.zeros(1))


@pytest.mark.parametrize(("value", "enabled"), [("1", True), ("true", True), (" Yes ", True), ("on", True),
                                                ("0", False), ("", False), ("no", False)])
def test_the_interpreter_switch_takes_the_usual_words_for_true(monkeypatch, value, enabled):
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert triton_support.interpreter_enabled() is enabled


@pytest.mark.parametrize(("value", "disabled"), [("1", True), ("yes", True), ("true", True), ("2", True),
                                                 ("anything", True), ("0", False), ("", False), (" ", False),
                                                 (" False ", False), ("no", False), ("OFF", False)])
def test_any_value_but_a_word_for_false_turns_the_kernels_off(monkeypatch, value, disabled):
    monkeypatch.setenv("NEXTSTEP_DISABLE_TRITON", value)
    assert triton_support.triton_disabled() is disabled
    assert triton_support.kernel_choice(True) is (not disabled)
    assert not (disabled and triton_support.triton_enabled(torch.zeros(1)))


def test_dependent_launches_need_a_hopper_or_later_and_end_with_their_context(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(triton_support, "dependent_launch_available", lambda: True)
    x = torch.zeros(2)
    for arch, expected in ((80, {}), (89, {}), (90, {"launch_pdl": True}), (100, {"launch_pdl": True})):
        previous = triton_support.set_compiling_for(arch)
        try:
            assert triton_support.dependent_launch_options(x) == {}
            with triton_support.dependent_launches():
                assert triton_support.dependent_launch_options(x) == expected, arch
                with triton_support.dependent_launches(False):
                    assert triton_support.dependent_launch_options(x) == {}
                assert triton_support.dependent_launch_options(x) == expected, arch
            assert triton_support.dependent_launch_options(x) == {}
        finally:
            triton_support.set_compiling_for(previous)


def test_cpu_tensors_take_their_kernel_while_compiling_for_a_gpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("NEXTSTEP_DISABLE_TRITON", raising=False)
    x = torch.zeros(1)
    assert not triton_support.triton_enabled(x)
    previous = triton_support.set_compiling_for(90)
    try:
        assert triton_support.triton_enabled(x)
        monkeypatch.setenv("NEXTSTEP_DISABLE_TRITON", "1")
        assert not triton_support.triton_enabled(x)
    finally:
        triton_support.set_compiling_for(previous)
