"""Shared set-up of the kernel tests: Triton kernels run on CPU tensors through Triton's interpreter.

The interpreter must be on (``TRITON_INTERPRET=1``) before anything imports
Triton, and importing ``nextstep`` (through ``torch._dynamo``) does. ``make
test`` sets it for the whole run; a kernel test module run on its own sets it
itself before its first import of the library.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import strategies as st

DTYPES = st.sampled_from([torch.float32, torch.bfloat16])

#: Tolerances of a kernel against its reference: fp32 agrees to rounding; bf16
#: outputs may differ by one unit in the last place (different summation order).
TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.fixture(scope="module")
def interpreter():
    """Skip unless Triton's interpreter is in effect for this process (Triton imported with it on)."""
    pytest.importorskip("triton")
    from nextstep.kernels.triton_support import interpreter_active, triton_disabled

    if not interpreter_active():
        pytest.skip("Triton was imported without TRITON_INTERPRET=1; run `make test`, or "
                    "`TRITON_INTERPRET=1 python -m pytest ...`")
    if triton_disabled():
        pytest.skip("NEXTSTEP_DISABLE_TRITON turns the kernels off")


def random_tensor(shape, dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    """Standard normal values times ``scale``, drawn in fp32 from ``seed`` and cast to ``dtype``."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * scale).to(dtype)
