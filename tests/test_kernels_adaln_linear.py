"""The fused AdaLN block matrix-product kernels against their eager references (interpreter on CPU, or GPU)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first import of Triton; see kernel_helpers

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from kernel_helpers import DTYPES, TOLERANCES, kernel_device, random_tensor, using  # noqa: E402,F401

from nextstep.kernels.adaln_linear import (  # noqa: E402
    Tiles,
    gated_linear,
    gated_linear_reference,
    gated_linear_triton,
    modulated_linear_reference,
    modulated_linear_triton,
    set_tiles,
)

SHAPES = dict(rows=st.integers(1, 20), inner=st.integers(1, 150), outer=st.integers(1, 40))
#: The default tiles and two others: results must not depend on them beyond rounding.
TILES = st.sampled_from([Tiles(), Tiles(block_n=32, block_k=64, num_warps=8),
                         Tiles(block_n=16, block_k=256, num_warps=2),
                         Tiles(block_n=8, block_k=512, num_warps=4, rows_product=True),
                         Tiles(block_n=1, block_k=64, num_warps=1, rows_product=True)])


@given(**SHAPES, dtype=DTYPES, seed=st.integers(0, 2**16), activation=st.booleans(), with_bias=st.booleans(),
       offset=st.sampled_from([0.0, 5.0]), tile=TILES)
def test_modulated_linear_matches_reference(kernel_device, rows, inner, outer, dtype,  # noqa: F811
                                            seed, activation, with_bias, offset, tile):
    # shift and scale as strided views, as in the head
    table = random_tensor((rows, 3, inner), dtype, seed, device=kernel_device)
    x = (random_tensor((rows, inner), torch.float32, seed + 1, device=kernel_device) + offset).to(dtype)
    weight = random_tensor((outer, inner), dtype, seed + 2, scale=inner ** -0.5, device=kernel_device)
    bias = random_tensor((outer,), dtype, seed + 3, device=kernel_device) if with_bias else None
    expected = modulated_linear_reference(x, table[:, 0], table[:, 2], weight, bias, 1e-6, activation)
    with using(set_tiles, tile):
        found = modulated_linear_triton(x, table[:, 0], table[:, 2], weight, bias, 1e-6, activation)
    assert found.dtype == dtype
    tolerance = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else TOLERANCES[dtype]
    torch.testing.assert_close(found.float(), expected.float(), **tolerance)


@given(**SHAPES, dtype=DTYPES, seed=st.integers(0, 2**16), with_bias=st.booleans(), in_place=st.booleans(),
       tile=TILES)
def test_gated_linear_matches_reference(kernel_device, rows, inner, outer, dtype, seed,  # noqa: F811
                                        with_bias, in_place, tile):
    u = random_tensor((rows, inner), dtype, seed, device=kernel_device)
    weight = random_tensor((outer, inner), dtype, seed + 1, scale=inner ** -0.5, device=kernel_device)
    bias = random_tensor((outer,), dtype, seed + 2, device=kernel_device) if with_bias else None
    gate = random_tensor((rows, 2, outer), dtype, seed + 3, device=kernel_device)[:, 1]  # strided rows
    residual = random_tensor((rows, outer), dtype, seed + 4, device=kernel_device)
    expected = gated_linear_reference(u, weight, bias, gate, residual)
    target = residual.clone() if in_place else None
    with using(set_tiles, tile):
        found = gated_linear_triton(u, weight, bias, gate, residual if target is None else target, out=target)
    tolerance = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else TOLERANCES[dtype]
    torch.testing.assert_close(found.float(), expected.float(), **tolerance)


def test_references_are_the_unfused_block():
    x, shift, scale = (random_tensor((3, 8), torch.float32, seed) for seed in range(3))
    first, first_bias = random_tensor((5, 8), torch.float32, 3), random_tensor((5,), torch.float32, 4)
    inner = F.silu(F.linear(F.layer_norm(x, (8,), eps=1e-6) * scale + shift, first, first_bias))
    torch.testing.assert_close(modulated_linear_reference(x, shift, scale, first, first_bias, 1e-6, True), inner)
    second, gate = random_tensor((8, 5), torch.float32, 5), random_tensor((3, 8), torch.float32, 6)
    torch.testing.assert_close(gated_linear(inner, second, None, gate, x), x + gate * F.linear(inner, second))
    with pytest.raises(ValueError, match=r"gate must have shape \(3, 8\), found \(3, 4\)"):
        gated_linear(inner, second, None, torch.zeros(3, 4), x)


def test_tiles_are_checked():
    with pytest.raises(ValueError, match="block_k must be a power of two >= 16, found 100"):
        Tiles(block_k=100)
    with pytest.raises(ValueError, match="block_n must be a power of two >= 16, found 8"):
        Tiles(block_n=8)
    assert Tiles(block_n=8, rows_product=True).block_n == 8
    with pytest.raises(ValueError, match="num_warps must be 1, 2, 4, 8 or 16, found 3"):
        Tiles(num_warps=3)
    with pytest.raises(TypeError, match="set_tiles takes a Tiles, found dict"):
        set_tiles({"block_n": 16})
