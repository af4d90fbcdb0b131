"""The fused residual add + RMSNorm kernel against its eager reference (interpreter on CPU, or GPU)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first import of Triton; see kernel_helpers

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from kernel_helpers import DTYPES, TOLERANCES, kernel_device, random_tensor  # noqa: E402,F401

from nextstep.kernels import add_rms_norm, add_rms_norm_reference, add_rms_norm_triton  # noqa: E402


@given(rows=st.integers(1, 6), width=st.integers(1, 700), dtype=DTYPES, seed=st.integers(0, 2**16),
       with_delta=st.booleans(), strided=st.booleans(), eps=st.sampled_from([1e-6, 1e-5]))
def test_kernel_matches_reference(kernel_device, rows, width, dtype, seed, with_delta, strided, eps):  # noqa: F811
    x = random_tensor((rows, 2 * width), dtype, seed, device=kernel_device)
    x = x[:, :width] if strided else x[:, width:].contiguous()
    delta = random_tensor((rows, width), dtype, seed + 1, device=kernel_device) if with_delta else None
    weight = random_tensor((width,), dtype, seed + 2, device=kernel_device)
    expected_total, expected = add_rms_norm_reference(x, delta, weight, eps)
    total, normed = add_rms_norm_triton(x, delta, weight, eps)
    assert total.dtype == normed.dtype == dtype
    # fp32: the same add; bf16: one rounding, which Triton's interpreter may do towards zero
    exact = dict(rtol=0, atol=0) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-5)
    torch.testing.assert_close(total.float(), expected_total.float(), **exact)
    torch.testing.assert_close(normed.float(), expected.float(), **TOLERANCES[dtype])


def test_reference_is_the_add_then_pytorchs_rms_norm():
    x, delta = (random_tensor((3, 40), torch.float32, seed) for seed in range(2))
    weight = random_tensor((40,), torch.float32, 2)
    total, normed = add_rms_norm_reference(x, delta, weight, 1e-6)
    torch.testing.assert_close(total, x + delta, rtol=0, atol=0)
    torch.testing.assert_close(normed, F.rms_norm(x + delta, (40,), weight, 1e-6))
    same, _ = add_rms_norm_reference(x, None, weight, 1e-6)
    assert same is x


def test_bad_shapes_name_what_was_expected():
    x = torch.zeros(2, 8)
    with pytest.raises(ValueError, match=r"delta must have the shape of x \(2, 8\), found \(2, 7\)"):
        add_rms_norm(x, torch.zeros(2, 7), torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\), found \(7,\)"):
        add_rms_norm(x, None, torch.ones(7), 1e-6)
    with pytest.raises(ValueError, match=r"x must have shape \(M, H\), found \(8,\)"):
        add_rms_norm(torch.zeros(8), None, torch.ones(8), 1e-6)
