"""The few-rows matrix-vector kernel against torch.nn.functional.linear (interpreter on CPU, or GPU)."""

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first import of Triton; see kernel_helpers

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from kernel_helpers import DTYPES, TOLERANCES, kernel_device, random_tensor, using  # noqa: E402,F401

from nextstep.fast.weight_quantization import quantize_int8  # noqa: E402
from nextstep.kernels.skinny_linear import (  # noqa: E402
    MAX_ROWS,
    ROWS_PER_PROGRAM,
    SkinnyTiles,
    set_skinny_tiles,
    skinny_linear,
    skinny_linear_reference,
    skinny_linear_triton,
)

#: The default tiles and others: results must not depend on them beyond rounding.
TILES = st.sampled_from([SkinnyTiles(), SkinnyTiles(block_n=1, block_k=64, num_warps=1, num_stages=1),
                         SkinnyTiles(block_n=32, block_k=128, num_warps=8, num_stages=2)])


@given(rows=st.integers(1, MAX_ROWS), inner=st.integers(1, 700), outer=st.integers(1, 70), dtype=DTYPES,
       seed=st.integers(0, 2**16), with_bias=st.booleans(), strided=st.booleans(), tile=TILES,
       int8=st.booleans())
def test_kernel_matches_reference(kernel_device, rows, inner, outer, dtype, seed, with_bias, strided,  # noqa: F811
                                  tile, int8):
    x = random_tensor((rows, 2 * inner), dtype, seed, device=kernel_device)
    x = x[:, :inner] if strided else x[:, inner:].contiguous()
    weight = random_tensor((outer, inner), dtype, seed + 1, scale=inner ** -0.5, device=kernel_device)
    bias = random_tensor((outer,), dtype, seed + 2, device=kernel_device) if with_bias else None
    scale = None
    if int8:
        quantized = quantize_int8(weight)
        weight, scale = quantized.values, quantized.scale
    expected = F.linear(x.float(), weight.float() if scale is None else weight.float() * scale[:, None],
                        None if bias is None else bias.float())
    with using(set_skinny_tiles, tile):
        found = skinny_linear_triton(x, weight, bias, scale)
    assert found.shape == (rows, outer) and found.dtype == dtype
    tolerance = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else TOLERANCES[dtype]
    torch.testing.assert_close(found.float(), expected, **tolerance)


def test_more_rows_than_the_kernel_takes_use_the_library_product(monkeypatch):
    module = sys.modules[skinny_linear.__module__]

    def kernel_not_expected(*args):
        raise AssertionError("the kernel ran")

    monkeypatch.setattr(module, "skinny_linear_triton", kernel_not_expected)
    x, weight = torch.randn(ROWS_PER_PROGRAM + 1, 8), torch.randn(4, 8)
    torch.testing.assert_close(skinny_linear(x, weight), F.linear(x, weight))
    quantized = quantize_int8(weight)
    x = torch.randn(MAX_ROWS + 1, 8)
    torch.testing.assert_close(skinny_linear(x, quantized.values, None, quantized.scale),
                               F.linear(x, quantized.values.float() * quantized.scale[:, None]))
    with pytest.raises(ValueError, match=f"at most {MAX_ROWS} rows, found {MAX_ROWS + 1}"):
        skinny_linear_triton(x, weight, None)


def test_bad_input_names_what_was_expected():
    with pytest.raises(ValueError, match=r"weight must have shape \(N, 8\), found \(4, 7\)"):
        skinny_linear_reference(torch.zeros(2, 8), torch.zeros(4, 7), None)
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\), found \(3,\)"):
        skinny_linear(torch.zeros(2, 8), torch.zeros(4, 8), torch.zeros(3))
    with pytest.raises(ValueError, match="an int8 weight needs its scale and only an int8 weight takes one"):
        skinny_linear(torch.zeros(2, 8), torch.zeros(4, 8, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"scale must have shape \(4,\), found \(3,\)"):
        skinny_linear(torch.zeros(2, 8), torch.zeros(4, 8, dtype=torch.int8), None, torch.ones(3))
    with pytest.raises(ValueError, match="block_k must be a power of two >= 16, found 8"):
        SkinnyTiles(block_k=8)
    with pytest.raises(ValueError, match="num_stages must be an integer >= 1, found 0"):
        SkinnyTiles(num_stages=0)


@pytest.mark.parametrize("with_bias", [False, True])
def test_a_product_over_no_input_features_is_the_bias(kernel_device, with_bias):  # noqa: F811
    x = torch.zeros(3, 0, device=kernel_device)
    weight = torch.zeros(5, 0, device=kernel_device)
    bias = random_tensor((5,), torch.float32, 0, device=kernel_device) if with_bias else None
    found = skinny_linear_triton(x, weight, bias)
    torch.testing.assert_close(found, F.linear(x, weight, bias), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_an_int8_product_returns_the_dtype_of_x(dtype):
    quantized = quantize_int8(random_tensor((6, 8), torch.float32, 0))
    x = random_tensor((MAX_ROWS + 1, 8), dtype, 1)
    for product in (skinny_linear_reference, skinny_linear):
        assert product(x, quantized.values, None, quantized.scale).dtype == dtype


def test_the_kernel_takes_up_to_a_program_s_rows_of_a_floating_weight_and_up_to_max_rows_of_int8():
    from nextstep.kernels.skinny_linear import skinny_kernel_takes

    floating, int8 = torch.zeros(4, 8), torch.zeros(4, 8, dtype=torch.int8)
    assert skinny_kernel_takes(torch.zeros(ROWS_PER_PROGRAM, 8), floating)
    assert not skinny_kernel_takes(torch.zeros(ROWS_PER_PROGRAM + 1, 8), floating)
    assert skinny_kernel_takes(torch.zeros(MAX_ROWS, 8), int8)
    assert not skinny_kernel_takes(torch.zeros(MAX_ROWS + 1, 8), int8)
