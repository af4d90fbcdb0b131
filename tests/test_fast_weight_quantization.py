"""Per-row int8 weights: the rounding error bound, and the fused decode step through them."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first import of Triton; see kernel_helpers

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_fast_fused_decode import decode, random_backbone  # noqa: E402

from nextstep.fast import FastTokenSampler  # noqa: E402
from nextstep.fast.fused_decode import FusedDecodeStack  # noqa: E402
from nextstep.fast.weight_quantization import quantize_int8  # noqa: E402


@given(rows=st.integers(1, 6), columns=st.integers(1, 50), seed=st.integers(0, 2**16),
       spread=st.sampled_from([1e-4, 1.0, 1e3]), zero_row=st.booleans())
def test_each_weight_is_within_half_a_step_of_its_row(rows, columns, seed, spread, zero_row):
    weight = torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed)) * spread
    if zero_row:
        weight[0] = 0.0
    quantized = quantize_int8(weight)
    assert quantized.values.dtype == torch.int8 and quantized.values.abs().max() <= 127
    error = (quantized.dequantize() - weight).abs()
    assert torch.all(error <= quantized.scale[:, None] / 2 * (1 + 1e-6))
    assert torch.equal(quantized.values.abs().amax(dim=1)[1 if zero_row else 0:],
                       torch.full((rows - (1 if zero_row else 0),), 127, dtype=torch.int8))
    assert quantized.nbytes == rows * columns + 4 * rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_fused_step_through_int8_weights_stays_close_to_the_model(seed):
    backbone = random_backbone(seed=seed)
    expected, _ = decode(backbone, False, 0)
    found, _ = decode(backbone, True, 0, int8_weights=True)
    relative = ((found - expected).norm() / expected.norm()).item()
    assert 0 < relative < 0.02, relative  # about 0.3% with these random weights


def test_the_int8_copies_follow_a_repack_and_the_sampler_checks_its_options():
    backbone = random_backbone()
    stack = FusedDecodeStack(backbone, int8_weights=True)
    assert stack.skinny and stack.products[0]["qkv"][0].dtype == torch.int8
    backbone.double()
    assert stack.refresh() and stack.products[0]["o"][2].dtype == torch.float32
    with pytest.raises(ValueError, match="decode_weights must be one of"):
        FastTokenSampler(_Model(backbone), fused_decode=True, decode_weights="int4")
    with pytest.raises(ValueError, match="decode_weights='int8' needs fused_decode=True"):
        FastTokenSampler(_Model(backbone), decode_weights="int8")
    with pytest.raises(ValueError, match="dependent_launches=True needs fused_decode=True"):
        FastTokenSampler(_Model(backbone), dependent_launches=True)
    with pytest.raises(ValueError, match="compile_backbone=True compiles the backbone's own decoder stack"):
        FastTokenSampler(_Model(backbone), compile_backbone=True, fused_decode=True, decode_weights="int8")


def test_quantize_int8_names_what_it_takes():
    with pytest.raises(ValueError, match=r"a floating \(N, K\) matrix with K >= 1, found \(3,\) torch.float32"):
        quantize_int8(torch.zeros(3))


class _Model:
    """Just enough of a NextStep model for FastTokenSampler's constructor."""

    def __init__(self, backbone):
        self.backbone = backbone


def test_non_finite_weights_are_named():
    weight = torch.ones(4, 3)
    weight[2, 1] = float("nan")
    weight[3, 0] = float("inf")
    with pytest.raises(ValueError, match=r"finite weights, found NaN or infinite values in rows \[2, 3\]"):
        quantize_int8(weight)


def test_a_row_of_zeros_gets_scale_one_and_zero_values():
    weight = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    weight[1] = 0.0
    quantized = quantize_int8(weight)
    assert quantized.scale[1] == 1.0 and not quantized.values[1].any()
    assert torch.equal(quantized.dequantize()[1], torch.zeros(5))
