"""The fused SwiGLU kernel against its eager reference (interpreter on CPU, or GPU)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first import of Triton; see kernel_helpers

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from kernel_helpers import DTYPES, TOLERANCES, kernel_device, random_tensor  # noqa: E402,F401

from nextstep.kernels import swiglu, swiglu_reference, swiglu_triton  # noqa: E402


@given(rows=st.integers(1, 5), width=st.integers(1, 1500), dtype=DTYPES, seed=st.integers(0, 2**16),
       packed=st.booleans())
def test_kernel_matches_reference(kernel_device, rows, width, dtype, seed, packed):  # noqa: F811
    if packed:  # the two halves of one (M, 2F) projection output: strided rows
        gate_up = random_tensor((rows, 2 * width), dtype, seed, scale=4.0, device=kernel_device)
        gate, up = gate_up[:, :width], gate_up[:, width:]
    else:
        gate = random_tensor((rows, width), dtype, seed, scale=4.0, device=kernel_device)
        up = random_tensor((rows, width), dtype, seed + 1, device=kernel_device)
    found = swiglu_triton(gate, up)
    assert found.dtype == dtype and found.is_contiguous()
    torch.testing.assert_close(found.float(), swiglu_reference(gate, up).float(), **TOLERANCES[dtype])


def test_reference_is_silu_times_up():
    gate, up = random_tensor((3, 10), torch.float32, 0), random_tensor((3, 10), torch.float32, 1)
    torch.testing.assert_close(swiglu(gate, up), F.silu(gate) * up)


def test_bad_shapes_name_what_was_expected():
    with pytest.raises(ValueError, match=r"up must have the shape of gate \(2, 3\), found \(2, 4\)"):
        swiglu(torch.zeros(2, 3), torch.zeros(2, 4))


def test_the_reference_is_the_backbone_mlp_s_own_activation():
    """Checked against the backbone's layer, not only against the kernel: silu of the gate times up."""
    from nextstep.backbones.qwen2 import Qwen2BackboneConfig, Qwen2MLP

    torch.manual_seed(0)
    mlp = Qwen2MLP(Qwen2BackboneConfig(vocab_size=16, hidden_size=32, intermediate_size=48, num_layers=1,
                                       num_heads=4, num_kv_heads=2))
    x = torch.randn(3, 32)
    torch.testing.assert_close(mlp.down_proj(swiglu_reference(mlp.gate_proj(x), mlp.up_proj(x))), mlp(x))


@given(rows=st.integers(2, 4), width=st.integers(1, 300), dtype=DTYPES, seed=st.integers(0, 2**16))
def test_gate_and_up_rows_may_have_different_strides(kernel_device, rows, width, dtype, seed):  # noqa: F811
    gate = random_tensor((rows, 3 * width), dtype, seed, scale=4.0, device=kernel_device)[:, width:2 * width]
    up = random_tensor((rows, width), dtype, seed + 1, device=kernel_device)
    found = swiglu_triton(gate, up)
    torch.testing.assert_close(found.float(), swiglu_reference(gate, up).float(), **TOLERANCES[dtype])
