"""Edge cases of the fused kernels' wrappers: argument checks, dtypes, empty inputs, outputs and dispatch."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first import of Triton; see kernel_helpers

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from kernel_helpers import TOLERANCES, interpreter, kernel_device, random_tensor  # noqa: E402,F401

from nextstep.fast.weight_quantization import quantize_int8  # noqa: E402
from nextstep.kernels import (  # noqa: E402
    add_rms_norm,
    add_rms_norm_reference,
    add_rms_norm_triton,
    gated_linear,
    gated_linear_triton,
    guided_update,
    guided_update_reference,
    guided_update_triton,
    layer_norm_modulate,
    layer_norm_modulate_reference,
    layer_norm_modulate_triton,
    modulated_linear,
    modulated_linear_reference,
    modulated_linear_triton,
    rotate_into_cache,
    rotate_into_cache_reference,
    rotate_into_cache_triton,
    skinny_linear,
    skinny_linear_reference,
    skinny_linear_triton,
    swiglu,
    swiglu_reference,
    swiglu_triton,
)
from nextstep.kernels.adaln_linear import Tiles, set_tiles  # noqa: E402
from nextstep.kernels.persistent_head import (  # noqa: E402
    MAX_ROWS,
    PersistentHeadWeights,
    features_per_program,
    persistent_head_triton,
    persistent_programs,
)
from nextstep.kernels.skinny_linear import SkinnyTiles, set_skinny_tiles  # noqa: E402
from nextstep.kernels.target_compile import (  # noqa: E402
    TARGETS,
    programs_per_multiprocessor,
    sass_fences,
    sass_loop_profile,
)
from nextstep.kernels.triton_support import (  # noqa: E402
    KernelFallbackWarning,
    contiguous_rows,
    dispatch,
    interpreter_problem,
    kernel_function,
    reduction_step,
    set_compiling_for,
)

META = torch.device("meta")


def test_guided_update_needs_at_least_one_branch_weight():
    """An empty weight table is refused, not read as an update without guidance."""
    with pytest.raises(ValueError, match=r"weights must have shape \(G,\) with G >= 1, found \(0,\)"):
        guided_update(torch.zeros(0, 4), torch.zeros(2, 4), torch.zeros(0), torch.zeros(3))


@pytest.mark.parametrize("shape", [(4,), (1, 3), (2,)])
def test_guided_update_takes_exactly_three_coefficients(shape):
    """``coefficients`` is exactly ``(a, b, c)``: neither more, nor fewer, nor another shape."""
    with pytest.raises(ValueError, match=r"coefficients must have shape \(3,\) = \(a, b, c\)"):
        guided_update(torch.zeros(2, 4), torch.zeros(2, 4), torch.ones(1), torch.zeros(shape))


def test_guided_update_names_a_tensor_on_another_device():
    """A tensor on another device than the state is named in the error."""
    state = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="predictions must be on cpu like state, found meta"):
        guided_update(torch.zeros(2, 4, device=META), state, torch.ones(1), torch.zeros(3))
    with pytest.raises(ValueError, match="coefficients must be on cpu like state, found meta"):
        guided_update(torch.zeros(2, 4), state, torch.ones(1), torch.zeros(3, device=META))


@pytest.mark.parametrize("update", [guided_update_reference, guided_update_triton, guided_update])
def test_guided_update_returns_the_dtype_of_the_state(kernel_device, update):  # noqa: F811
    """fp32 predictions and a bf16 state give a bf16 new state (computed in fp32, rounded once)."""
    predictions = random_tensor((4, 6), torch.float32, 0, device=kernel_device)
    state = random_tensor((2, 6), torch.bfloat16, 1, device=kernel_device)
    weights = torch.tensor([1.5, -0.5], device=kernel_device)
    coefficients = torch.tensor([1.0, 0.1, 0.0], device=kernel_device)
    found = update(predictions, state, weights, coefficients)
    assert found.dtype == torch.bfloat16 and found.shape == (2, 6)
    expected = state.float() + 0.1 * (1.5 * predictions[:2] - 0.5 * predictions[2:])
    torch.testing.assert_close(found.float(), expected, **TOLERANCES[torch.bfloat16])


def test_guided_update_of_no_rows_is_empty(kernel_device):  # noqa: F811
    """An update of no rows returns an empty state without launching anything."""
    found = guided_update_triton(
        torch.zeros(0, 4, device=kernel_device),
        torch.zeros(0, 4, device=kernel_device),
        torch.ones(2, device=kernel_device),
        torch.ones(3, device=kernel_device),
    )
    assert found.shape == (0, 4)


def test_swiglu_output_must_have_contiguous_rows(kernel_device):  # noqa: F811
    """The kernel writes into a given ``out`` only if it has the shape and contiguous rows."""
    gate = random_tensor((3, 4), torch.float32, 0, device=kernel_device)
    up = random_tensor((3, 4), torch.float32, 1, device=kernel_device)
    with pytest.raises(ValueError, match=r"out must have shape \(3, 4\) with contiguous rows, found \(3, 4\)"):
        swiglu_triton(gate, up, out=torch.empty(4, 3, device=kernel_device).t())
    with pytest.raises(ValueError, match=r"out must have shape \(3, 4\) with contiguous rows, found \(3, 5\)"):
        swiglu_triton(gate, up, out=torch.empty(3, 5, device=kernel_device))
    out = torch.empty(3, 4, device=kernel_device)
    assert swiglu_triton(gate, up, out=out) is out
    torch.testing.assert_close(out, F.silu(gate) * up, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("shape", [(0, 5), (3, 0)])
def test_swiglu_of_an_empty_input_is_empty(kernel_device, shape):  # noqa: F811
    """No rows or no features give an empty output of that shape."""
    gate = torch.zeros(shape, device=kernel_device)
    assert swiglu_triton(gate, gate).shape == shape


@pytest.mark.parametrize("activation", [swiglu_reference, swiglu_triton, swiglu])
def test_swiglu_returns_the_dtype_of_the_gate(kernel_device, activation):  # noqa: F811
    """With mixed dtypes the output takes the gate's dtype, in every form of the operation."""
    gate = random_tensor((2, 8), torch.bfloat16, 0, scale=3.0, device=kernel_device)
    up = random_tensor((2, 8), torch.float32, 1, device=kernel_device)
    found = activation(gate, up)
    assert found.dtype == torch.bfloat16
    torch.testing.assert_close(found.float(), F.silu(gate.float()) * up, **TOLERANCES[torch.bfloat16])
    assert activation(up, gate).dtype == torch.float32


@pytest.mark.parametrize("shape", [(9,), (1, 8), (4,)])
def test_add_rms_norm_weight_must_be_one_gain_per_feature(shape):
    """The gain must have shape (H,): not longer, shorter, or with another axis."""
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        add_rms_norm(torch.zeros(2, 8), torch.zeros(2, 8), torch.ones(shape), 1e-6)


@pytest.mark.parametrize("norm", [add_rms_norm_reference, add_rms_norm_triton])
def test_add_rms_norm_eps_keeps_small_and_zero_rows_finite(kernel_device, norm):  # noqa: F811
    """eps is added to the mean square: it dominates for rows near zero, and a zero row stays zero."""
    x = torch.full((2, 8), 1e-3, device=kernel_device)
    x[1] = 0.0
    weight = torch.ones(8, device=kernel_device)
    _, normed = norm(x, None, weight, 1.0)
    expected = torch.tensor([1e-3 / (1e-6 + 1.0) ** 0.5, 0.0], device=kernel_device)[:, None].expand(2, 8)
    torch.testing.assert_close(normed, expected, rtol=1e-5, atol=1e-9)
    _, normed = norm(x, torch.zeros_like(x), weight, 1e-6)
    assert torch.isfinite(normed).all() and torch.equal(normed[1], torch.zeros(8, device=kernel_device))


@pytest.mark.parametrize("norm", [add_rms_norm_reference, add_rms_norm_triton, add_rms_norm])
def test_add_rms_norm_returns_the_dtype_of_x_with_an_fp32_gain(kernel_device, norm):  # noqa: F811
    """An fp32 gain on bf16 rows gives bf16 ``total`` and ``normed``."""
    x = random_tensor((3, 16), torch.bfloat16, 0, device=kernel_device)
    delta = random_tensor((3, 16), torch.bfloat16, 1, device=kernel_device)
    weight = random_tensor((16,), torch.float32, 2, device=kernel_device)
    total, normed = norm(x, delta, weight, 1e-6)
    assert total.dtype == normed.dtype == torch.bfloat16
    expected = F.rms_norm((x + delta).float(), (16,), weight, 1e-6)
    torch.testing.assert_close(normed.float(), expected, **TOLERANCES[torch.bfloat16])


@pytest.mark.parametrize("modulate", [layer_norm_modulate_reference, layer_norm_modulate_triton, layer_norm_modulate])
def test_layer_norm_modulate_default_eps_is_one_in_a_million(kernel_device, modulate):  # noqa: F811
    """Rows whose variance is near eps show which eps was used."""
    x = random_tensor((2, 32), torch.float32, 0, scale=1e-3, device=kernel_device)
    shift = torch.zeros(2, 32, device=kernel_device)
    scale = torch.ones(2, 32, device=kernel_device)
    torch.testing.assert_close(modulate(x, shift, scale), F.layer_norm(x, (32,), eps=1e-6), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(modulate(x, shift, scale, 1e-4), F.layer_norm(x, (32,), eps=1e-4), rtol=1e-4, atol=1e-5)


def test_layer_norm_modulate_output_must_have_contiguous_rows(kernel_device):  # noqa: F811
    """The kernel writes into a given ``out`` only if its rows are contiguous."""
    x, shift, scale = (random_tensor((3, 4), torch.float32, seed, device=kernel_device) for seed in range(3))
    with pytest.raises(ValueError, match=r"out must have shape \(3, 4\) with contiguous rows"):
        layer_norm_modulate_triton(x, shift, scale, out=torch.empty(4, 3, device=kernel_device).t())
    out = torch.empty(3, 4, device=kernel_device)
    assert layer_norm_modulate_triton(x, shift, scale, out=out) is out
    torch.testing.assert_close(out, layer_norm_modulate_reference(x, shift, scale), **TOLERANCES[torch.float32])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: layer_norm_modulate(torch.zeros(2, 4), torch.zeros(2, 4, device=META), torch.zeros(2, 4)),
            "shift must be on cpu like x, found meta",
        ),
        (
            lambda: layer_norm_modulate(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2, 4, device=META)),
            "scale must be on cpu like x, found meta",
        ),
        (lambda: swiglu(torch.zeros(2, 4), torch.zeros(2, 4, device=META)), "up must be on cpu like gate, found meta"),
        (
            lambda: add_rms_norm(torch.zeros(2, 4), None, torch.ones(4, device=META), 1e-6),
            "weight must be on cpu like x, found meta",
        ),
    ],
)
def test_inputs_on_another_device_are_named(call, message):
    """A second input on another device than the first is named in the error."""
    with pytest.raises(ValueError, match=message):
        call()


def rotary_inputs(batch, kv_heads, heads, head_dim, slots, device="cpu"):
    qkv = random_tensor((batch, (heads + 2 * kv_heads) * head_dim), torch.float32, 0, device=device)
    cos = random_tensor((batch, head_dim), torch.float32, 1, device=device)
    signed_sin = random_tensor((batch, head_dim), torch.float32, 2, device=device)
    keys = torch.zeros(batch, kv_heads, slots, head_dim, device=device)
    return qkv, cos, signed_sin, keys, torch.zeros_like(keys), torch.tensor([0], device=device)


def test_rotary_cache_needs_an_even_head_dim():
    """An odd head dim cannot be rotated by halves and is refused."""
    qkv, cos, sin, keys, values, slot = rotary_inputs(1, 1, 2, 3, 4)
    with pytest.raises(ValueError, match="the head dim must be even for rotary embeddings, found 3"):
        rotate_into_cache(qkv, cos, sin, keys, values, slot, 2, 1)


@pytest.mark.parametrize(("heads", "kv_heads"), [(0, 1), (2, 0), (2.0, 1)])
def test_rotary_cache_needs_at_least_one_head_of_each_kind(heads, kv_heads):
    """Head counts must be integers >= 1."""
    qkv, cos, sin, keys, values, slot = rotary_inputs(1, 1, 0, 4, 4)
    with pytest.raises(ValueError, match="num_heads and num_kv_heads must be integers >= 1"):
        rotate_into_cache(qkv, cos, sin, keys, values, slot, heads, kv_heads)


def test_rotary_cache_kernel_needs_keys_and_values_with_one_layout(kernel_device):  # noqa: F811
    """The kernel addresses both caches with one set of strides, so they must share them."""
    qkv, cos, sin, keys, _, slot = rotary_inputs(2, 2, 2, 4, 3, kernel_device)
    values = torch.zeros(2, 3, 2, 4, device=kernel_device).transpose(1, 2)  # (B, K, T, E), another layout
    with pytest.raises(ValueError, match="keys and values must share strides with a contiguous last axis"):
        rotate_into_cache_triton(qkv, cos, sin, keys, values, slot, 2, 2)
    with pytest.raises(ValueError, match="keys and values must share strides with a contiguous last axis"):
        rotate_into_cache_triton(
            qkv,
            cos,
            sin,
            keys.transpose(2, 3).contiguous().transpose(2, 3),
            keys.clone().transpose(2, 3).contiguous().transpose(2, 3),
            slot,
            2,
            2,
        )


def test_rotary_cache_of_two_layouts_is_written_by_the_reference(kernel_device):  # noqa: F811
    """Where the kernel cannot address both caches, `rotate_into_cache` writes them as the reference does."""
    qkv, cos, sin, keys, _, slot = rotary_inputs(2, 2, 2, 4, 3, kernel_device)
    values = torch.zeros(2, 3, 2, 4, device=kernel_device).transpose(1, 2)
    expected_keys, expected_values = keys.clone(), values.clone()
    expected = rotate_into_cache_reference(qkv, cos, sin, expected_keys, expected_values, slot, 2, 2)
    query = rotate_into_cache(qkv, cos, sin, keys, values, slot, 2, 2)
    torch.testing.assert_close(query, expected, rtol=0, atol=0)
    torch.testing.assert_close(keys, expected_keys, rtol=0, atol=0)
    torch.testing.assert_close(values, expected_values, rtol=0, atol=0)
    assert values[:, :, 0].abs().sum() > 0


def test_rotary_cache_of_no_rows_is_empty(kernel_device):  # noqa: F811
    """No rows give an empty (0, N, E) query."""
    qkv, cos, sin, keys, values, slot = rotary_inputs(0, 1, 2, 4, 3, kernel_device)
    assert rotate_into_cache_triton(qkv, cos, sin, keys, values, slot, 2, 1).shape == (0, 2, 4)


def test_rotary_cache_keys_of_a_bf16_projection_are_rounded_to_bf16_in_an_fp32_cache(kernel_device):  # noqa: F811
    """The rotated keys are rounded to the projection's dtype, then stored in the cache's, like the reference."""
    qkv, cos, sin, keys, values, slot = rotary_inputs(2, 1, 2, 8, 3, kernel_device)
    qkv, cos, sin = qkv.bfloat16(), cos.bfloat16(), sin.bfloat16()
    expected_keys, expected_values = keys.clone(), values.clone()
    expected = rotate_into_cache_reference(qkv, cos, sin, expected_keys, expected_values, slot, 2, 1)
    query = rotate_into_cache_triton(qkv, cos, sin, keys, values, slot, 2, 1)
    assert query.dtype == torch.bfloat16 and keys.dtype == torch.float32
    assert query.is_contiguous() and expected.is_contiguous()
    assert torch.equal(keys, keys.bfloat16().float())
    torch.testing.assert_close(keys, expected_keys, **TOLERANCES[torch.bfloat16])
    torch.testing.assert_close(query.float(), expected.float(), **TOLERANCES[torch.bfloat16])


def test_skinny_linear_of_no_rows_is_empty(kernel_device):  # noqa: F811
    """A product of no rows is an empty (0, N) output."""
    weight = random_tensor((5, 8), torch.float32, 0, device=kernel_device)
    found = skinny_linear_triton(torch.zeros(0, 8, device=kernel_device), weight, None)
    assert found.shape == (0, 5)
    assert skinny_linear(torch.zeros(0, 8, device=kernel_device), weight).shape == (0, 5)


def test_skinny_linear_of_no_output_features_is_empty(kernel_device):  # noqa: F811
    """A product with no output features is an empty (M, 0) output."""
    x = random_tensor((3, 8), torch.float32, 0, device=kernel_device)
    assert skinny_linear_triton(x, torch.zeros(0, 8, device=kernel_device), None).shape == (3, 0)


@pytest.mark.parametrize("product", [skinny_linear_reference, skinny_linear_triton, skinny_linear])
def test_an_int8_product_adds_its_bias_after_the_scale(kernel_device, product):  # noqa: F811
    """``x @ (weight * scale).T + bias`` for an int8 weight, in every form of the product."""
    weight = random_tensor((6, 16), torch.float32, 0, scale=0.25, device=kernel_device)
    quantized = quantize_int8(weight)
    x = random_tensor((3, 16), torch.float32, 1, device=kernel_device)
    bias = random_tensor((6,), torch.float32, 2, device=kernel_device) + 3.0
    found = product(x, quantized.values, bias, quantized.scale)
    expected = F.linear(x, quantized.values.float() * quantized.scale[:, None], bias)
    torch.testing.assert_close(found, expected, rtol=1e-4, atol=1e-4)


def test_tile_setters_take_only_their_own_tiles():
    """Each tile setter refuses the other kernel's tiles."""
    with pytest.raises(TypeError, match="set_skinny_tiles takes a SkinnyTiles, found Tiles"):
        set_skinny_tiles(Tiles())
    with pytest.raises(TypeError, match="set_tiles takes a Tiles, found SkinnyTiles"):
        set_tiles(SkinnyTiles())


@pytest.mark.parametrize(
    ("field", "value"),
    [("block_n", 8.0), ("block_k", 64.0), ("num_stages", 1.5), ("num_stages", 2.0), ("block_n", 0), ("block_n", 6)],
)
def test_skinny_tiles_take_integers_only(field, value):
    """Tile sizes and stage counts must be integers of the allowed values."""
    with pytest.raises(ValueError, match=f"{field} must be"):
        SkinnyTiles(**{field: value})


@pytest.mark.parametrize("warps", [0, 3, 32])
def test_tiles_take_only_the_warp_counts_a_launch_takes(warps):
    """Warp counts outside 1, 2, 4, 8, 16 are refused by both tile classes."""
    with pytest.raises(ValueError, match="num_warps must be 1, 2, 4, 8 or 16"):
        Tiles(num_warps=warps)
    with pytest.raises(ValueError, match="num_warps must be 1, 2, 4, 8 or 16"):
        SkinnyTiles(num_warps=warps)


def test_gated_linear_output_must_have_contiguous_rows(kernel_device):  # noqa: F811
    """The gated kernel writes into a given ``out`` only if its rows are contiguous."""
    u = random_tensor((3, 8), torch.float32, 0, device=kernel_device)
    weight = random_tensor((4, 8), torch.float32, 1, device=kernel_device)
    gate, residual = (random_tensor((3, 4), torch.float32, seed, device=kernel_device) for seed in (2, 3))
    with pytest.raises(ValueError, match=r"out must have shape \(3, 4\) with contiguous rows"):
        gated_linear_triton(u, weight, None, gate, residual, out=torch.empty(4, 3, device=kernel_device).t())
    out = torch.empty(3, 4, device=kernel_device)
    assert gated_linear_triton(u, weight, None, gate, residual, out=out) is out
    torch.testing.assert_close(out, residual + gate * F.linear(u, weight), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["gate", "residual"])
def test_gated_linear_gate_and_residual_must_match_the_output(name):
    """``gate`` and ``residual`` must have the (M, N) shape of the product."""
    u, weight = torch.zeros(3, 8), torch.zeros(4, 8)
    tensors = dict(gate=torch.zeros(3, 4), residual=torch.zeros(3, 4))
    tensors[name] = torch.zeros(3, 5)
    with pytest.raises(ValueError, match=rf"{name} must have shape \(3, 4\), found \(3, 5\)"):
        gated_linear(u, weight, None, **tensors)


@pytest.mark.parametrize("product", [modulated_linear_reference, modulated_linear_triton, modulated_linear])
def test_modulated_linear_of_bf16_weights_returns_the_dtype_of_x(kernel_device, product):  # noqa: F811
    """The modulated input is rounded to the weights' dtype for the product; the output has x's dtype."""
    x, shift, scale = (random_tensor((2, 16), torch.float32, seed, device=kernel_device) for seed in range(3))
    weight = random_tensor((4, 16), torch.bfloat16, 3, scale=0.25, device=kernel_device)
    found = product(x, shift, scale, weight, None, 1e-6, True)
    assert found.dtype == torch.float32
    a = layer_norm_modulate_reference(x, shift, scale).bfloat16().float()
    torch.testing.assert_close(found, F.silu(F.linear(a, weight.float())), rtol=2e-2, atol=2e-2)


def test_the_row_by_row_gated_product_rounds_u_to_the_weights_dtype(kernel_device):  # noqa: F811
    """With ``rows_product`` tiles, an fp32 u times bf16 weights is the product of u rounded to bf16."""
    u = random_tensor((2, 64), torch.float32, 0, device=kernel_device)
    weight = random_tensor((16, 64), torch.bfloat16, 1, scale=0.125, device=kernel_device)
    gate, residual = torch.ones(2, 16, device=kernel_device), torch.zeros(2, 16, device=kernel_device)
    tile = Tiles(block_n=16, block_k=64, rows_product=True)
    previous = set_tiles(tile)
    try:
        found = gated_linear_triton(u, weight, None, gate, residual)
    finally:
        set_tiles(previous)
    expected = F.linear(u.bfloat16().float(), weight.float())
    torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-5)


def test_modulated_linear_dispatch_applies_the_activation(kernel_device):  # noqa: F811
    """The dispatching function passes ``activation`` on to the kernel."""
    x, shift, scale = (random_tensor((2, 8), torch.float32, seed, device=kernel_device) for seed in range(3))
    weight = random_tensor((4, 8), torch.float32, 3, device=kernel_device)
    for activation in (False, True):
        expected = modulated_linear_reference(x, shift, scale, weight, None, 1e-6, activation)
        torch.testing.assert_close(
            modulated_linear(x, shift, scale, weight, None, 1e-6, activation), expected, rtol=1e-4, atol=1e-4
        )
    assert (modulated_linear(x, shift, scale, -weight, None, 1e-6, True) > -0.3).all()


def small_head_weights(blocks=1, width=16, inner_width=32, token_dim=8):
    def tensor(*shape):
        return torch.zeros(shape)

    return PersistentHeadWeights(
        tensor(width, token_dim),
        tensor(width),
        [tensor(inner_width, width)] * blocks,
        [tensor(inner_width)] * blocks,
        [tensor(width, inner_width)] * blocks,
        [tensor(width)] * blocks,
        tensor(token_dim, width),
        tensor(token_dim),
        1e-6,
        1e-6,
    )


@pytest.mark.parametrize("rows", [0, MAX_ROWS + 1])
def test_the_persistent_head_takes_one_to_max_rows(interpreter, rows):  # noqa: F811
    """No rows, or more than `MAX_ROWS`, are refused with the allowed range."""
    weights = small_head_weights()
    with pytest.raises(ValueError, match=f"the persistent head takes 1 to {MAX_ROWS} rows, found {rows}"):
        persistent_head_triton(torch.zeros(rows, 8), torch.zeros(rows, 5, 16), weights, 1)


def test_the_persistent_head_of_zero_weights_is_zero(interpreter):  # noqa: F811
    """A head whose weights and biases are all zero has zero velocity."""
    weights = small_head_weights(blocks=2)
    x_t = random_tensor((3, 8), torch.float32, 0)
    modulation = random_tensor((3, 8, 16), torch.float32, 1)
    assert torch.equal(persistent_head_triton(x_t, modulation, weights, 1, features=8), torch.zeros(3, 8))


def test_each_program_owns_a_share_of_the_widest_product():
    """Each program's share covers the wider of the head width and the inner width."""
    assert features_per_program(16, 64, 4) == 16
    assert features_per_program(64, 16, 4) == 16
    assert features_per_program(10, 10, 3) == 4
    assert persistent_programs(10, 3, 4) == 3
    assert persistent_programs(10, None, 4) == 3
    assert persistent_programs(9, 4, 1) == 3  # 3 features each on 4 multiprocessors: the 4th would be idle


@pytest.mark.parametrize(
    ("block_k", "block_m", "block_n", "warps", "expected"),
    [
        (512, 4, 8, 4, 256),  # 2048 * 4 sums over 4 * 8 tile rows: 256 per row
        (512, 1, 8, 4, 512),
        (128, 4, 8, 4, 128),
        (512, 3, 8, 4, 256),  # 341 per row: the power of two below
        (512, 16, 64, 1, 16),  # never below 16
    ],
)
def test_reduction_step_keeps_the_running_sums_within_a_warp_s_share(block_k, block_m, block_n, warps, expected):
    """The reduction step shrinks to the largest power of two whose sums fit, never below 16."""
    assert reduction_step(block_k, block_m, block_n, warps) == expected


@settings(max_examples=50, deadline=None)
@given(
    block_k=st.sampled_from([16, 64, 512, 4096]),
    block_m=st.integers(1, 16),
    block_n=st.sampled_from([1, 8, 16, 64, 256]),
    warps=st.sampled_from([1, 2, 4, 8, 16]),
)
def test_reduction_step_is_the_largest_power_of_two_step_that_fits(block_k, block_m, block_n, warps):
    """The step is a power of two within [16, block_k], fits the budget, and doubling it would not."""
    step = reduction_step(block_k, block_m, block_n, warps)
    assert step & (step - 1) == 0 and 16 <= step <= max(16, block_k)
    budget = 2048 * warps
    assert step == 16 or block_m * block_n * step <= budget
    assert step == block_k or block_m * block_n * 2 * step > budget


def test_contiguous_rows_copies_only_tensors_with_a_strided_last_axis():
    """Row-strided views pass through; a strided last axis is copied."""
    wide = torch.arange(24.0).view(4, 6)
    rows = wide[:, 1:4]
    assert contiguous_rows(rows) is rows
    columns = torch.arange(12.0).view(3, 4).t()
    copied = contiguous_rows(columns)
    assert copied is not columns and copied.is_contiguous() and torch.equal(copied, columns)
    single_column = torch.arange(6.0).view(6, 1)[::2]  # stride (2, 1)
    assert contiguous_rows(single_column) is single_column
    assert contiguous_rows(None) is None


def test_numpy_2_4_itself_is_too_new_for_an_old_interpreter():
    """NumPy 2.4.0 already breaks a Triton < 3.7 interpreter; a version part without digits counts as 0."""
    assert interpreter_problem("3.6.0", "2.4.0") is not None
    assert interpreter_problem("3.6.0", "2.4") is not None
    assert interpreter_problem("3.6.0", "2.dev0") is None  # a part without digits counts as 0
    assert interpreter_problem("3.7.dev1", "2.4.0") is None


def test_a_kernel_that_fails_with_any_other_error_falls_back(monkeypatch):
    """Only ``ValueError`` is raised to the caller; a ``TypeError`` falls back to the reference."""
    from nextstep.kernels import triton_support

    monkeypatch.setattr(triton_support, "FAILED_KERNELS", {})
    monkeypatch.setattr(triton_support, "triton_enabled", lambda tensor: True)

    def kernel(x):
        raise TypeError("an argument the compiler does not take")

    x = torch.ones(2)
    with pytest.warns(KernelFallbackWarning, match="the Triton kernel of halving failed .*TypeError"):
        assert torch.equal(dispatch("halving", x, kernel, lambda t: t / 2, x), x / 2)


def test_kernel_function_picks_the_form_use_kernels_asks_for(monkeypatch):
    """None: the dispatching function; True: the kernel; False, or kernels turned off: the reference."""
    monkeypatch.delenv("NEXTSTEP_DISABLE_TRITON", raising=False)
    assert kernel_function(swiglu, None) is swiglu
    assert kernel_function(swiglu, True) is swiglu_triton
    assert kernel_function(swiglu, False) is swiglu_reference
    assert kernel_function(guided_update, True) is guided_update_triton
    monkeypatch.setenv("NEXTSTEP_DISABLE_TRITON", "1")
    assert kernel_function(swiglu, True) is swiglu_reference
    assert kernel_function(swiglu, None) is swiglu_reference


def test_set_compiling_for_returns_the_previous_setting():
    """Each call returns the architecture set before it."""
    first = set_compiling_for(90)
    try:
        assert set_compiling_for(80) == 90
        assert set_compiling_for(None) == 80
        assert set_compiling_for(None) is None
    finally:
        set_compiling_for(first)


def test_registers_are_allocated_per_warp_in_units_of_256():
    """Register use is rounded up per warp to units of 256, and each limit applies."""
    hopper = TARGETS["sm_90"]
    assert programs_per_multiprocessor(hopper, 33, 4, 0) == 12  # 33 * 32 = 1056 -> 1280 per warp: 51 warps
    assert programs_per_multiprocessor(hopper, 40, 4, 0) == 12
    assert programs_per_multiprocessor(hopper, 0, 4, 0) == 16  # at least one register
    assert programs_per_multiprocessor(hopper, 255, 16, 0) == 0
    assert programs_per_multiprocessor(TARGETS["sm_89"], 16, 1, 0) == 24  # the program limit


def test_shared_memory_per_program_includes_the_reserved_part():
    """Each program takes its shared memory plus the part the hardware reserves for it."""
    hopper = TARGETS["sm_90"]
    assert programs_per_multiprocessor(hopper, 16, 1, 57 * 1024) == 3  # 228 KiB / 58 KiB, not / 57 KiB


LOOP = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   STL.64 [R1+0x8], R4 ;
        /*0020*/                   CCTL.E.PF2 [R2] ;
        /*0030*/              @!P0 BRA 0x10 ;
        /*0040*/                   CCTL.IVALL ;
        /*0050*/                   EXIT ;
"""


def test_spill_stores_in_a_loop_count_as_local_accesses_and_only_ivall_invalidates_l1():
    """A local store in a loop is a spill like a local load; a CCTL that is not IVALL is no L1 invalidation."""
    assert sass_loop_profile(LOOP)["loop_local_accesses"] == 1
    assert sass_fences(LOOP) == {"memory_barriers": 0, "l1_invalidations": 1}
