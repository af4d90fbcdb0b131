"""Shared set-up of the kernel tests: Triton kernels on CPU tensors through Triton's interpreter, or compiled on a GPU.

The interpreter must be on (``TRITON_INTERPRET=1``) before anything imports
Triton, and importing ``nextstep`` (through ``torch._dynamo``) does. ``make
test`` sets it for the whole run; a kernel test module run on its own sets it
itself before its first import of the library. On a machine with CUDA, run
them with ``TRITON_INTERPRET=0``: the kernel-against-reference tests then
compile each kernel and run it on the GPU (`kernel_device`).
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from hypothesis import strategies as st

DTYPES = st.sampled_from([torch.float32, torch.bfloat16])

#: Tolerances of a kernel against its reference: fp32 agrees to rounding; bf16
#: outputs may differ by one unit in the last place (different summation order).
TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _require_triton():
    """Skip unless Triton is importable and the kernels are not turned off."""
    pytest.importorskip("triton")
    from nextstep.kernels.triton_support import triton_disabled

    if triton_disabled():
        pytest.skip("NEXTSTEP_DISABLE_TRITON turns the kernels off")


def _require_interpreter(alternative: str = ""):
    """Skip unless Triton's interpreter is in effect for this process (Triton imported with it on)."""
    from nextstep.kernels.triton_support import interpreter_active, interpreter_enabled, interpreter_problem

    problem = interpreter_problem() if interpreter_enabled() else None
    if problem is not None:
        pytest.skip(problem)
    if not interpreter_active():
        pytest.skip("Triton was imported without TRITON_INTERPRET=1; run `make test`, or "
                    f"`TRITON_INTERPRET=1 python -m pytest ...`{alternative}")


@pytest.fixture(scope="module")
def interpreter():
    """Skip unless Triton's interpreter is in effect for this process (Triton imported with it on)."""
    _require_triton()
    _require_interpreter()


@pytest.fixture(scope="module")
def kernel_device():
    """Where the kernel tests run the kernels: the GPU, compiled, when CUDA and Triton are there and the
    interpreter is off; else the CPU through Triton's interpreter (skipped when it is not in effect)."""
    _require_triton()
    from nextstep.kernels.triton_support import interpreter_enabled

    if torch.cuda.is_available() and not interpreter_enabled():
        return torch.device("cuda")
    _require_interpreter(" (or TRITON_INTERPRET=0 on a CUDA machine)")
    return torch.device("cpu")


@contextmanager
def using(setter, value):
    """Inside, ``setter(value)`` is in effect (a setter that returns the previous value, like
    `nextstep.kernels.adaln_linear.set_tiles`); restored after."""
    previous = setter(value)
    try:
        yield
    finally:
        setter(previous)


def random_tensor(shape, dtype, seed: int, scale: float = 1.0, device=None) -> torch.Tensor:
    """Standard normal values times ``scale``, drawn in fp32 on the CPU from ``seed``, cast to ``dtype`` and
    moved to ``device`` (default CPU)."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * scale).to(dtype=dtype, device=device)
