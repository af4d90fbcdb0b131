"""The fused rotary embedding + KV-cache write kernel against its eager reference (interpreter on CPU, or GPU)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first import of Triton; see kernel_helpers

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from kernel_helpers import DTYPES, TOLERANCES, kernel_device, random_tensor  # noqa: E402,F401

from nextstep.kernels import rotate_into_cache, rotate_into_cache_reference, rotate_into_cache_triton  # noqa: E402
from nextstep.layers.rotary import RotaryEmbedding, rotate  # noqa: E402


def inputs(batch, kv_heads, group, half, slots, slot, dtype, seed, device="cpu"):
    heads, head_dim = kv_heads * group, 2 * half
    qkv = random_tensor((batch, (heads + 2 * kv_heads) * head_dim), dtype, seed, device=device)
    positions = torch.randint(0, 4096, (batch, 1), generator=torch.Generator().manual_seed(seed)).to(device)
    cos, signed_sin = RotaryEmbedding(head_dim).to(device).signed_tables(positions, dtype)
    keys = random_tensor((batch, kv_heads, slots, head_dim), dtype, seed + 1, device=device)
    values = random_tensor((batch, kv_heads, slots, head_dim), dtype, seed + 2, device=device)
    return qkv, cos[:, 0], signed_sin[:, 0], keys, values, torch.tensor([slot], device=device), heads


@given(batch=st.integers(1, 4), kv_heads=st.integers(1, 3), group=st.integers(1, 4), half=st.integers(1, 40),
       slots=st.integers(1, 9), data=st.data(), dtype=DTYPES, seed=st.integers(0, 2**16))
def test_kernel_matches_reference(kernel_device, batch, kv_heads, group, half, slots, data, dtype,  # noqa: F811
                                  seed):
    slot = data.draw(st.integers(0, slots - 1))
    qkv, cos, sin, keys, values, slot_tensor, heads = inputs(batch, kv_heads, group, half, slots, slot, dtype, seed,
                                                             kernel_device)
    expected_keys, expected_values = keys.clone(), values.clone()
    expected = rotate_into_cache_reference(qkv, cos, sin, expected_keys, expected_values, slot_tensor, heads, kv_heads)
    found = rotate_into_cache_triton(qkv, cos, sin, keys, values, slot_tensor, heads, kv_heads)
    assert found.shape == (batch, heads, 2 * half) and found.dtype == dtype
    torch.testing.assert_close(found.float(), expected.float(), **TOLERANCES[dtype])
    torch.testing.assert_close(keys.float(), expected_keys.float(), **TOLERANCES[dtype])
    torch.testing.assert_close(values, expected_values, rtol=0, atol=0)  # copied, not computed


def test_a_slot_past_the_cache_writes_nothing(kernel_device):  # noqa: F811
    qkv, cos, sin, keys, values, _, heads = inputs(2, 1, 2, 2, 4, 0, torch.float32, 0, kernel_device)
    before_keys, before_values = keys.clone(), values.clone()
    rotate_into_cache_triton(qkv, cos, sin, keys, values, torch.tensor([4], device=kernel_device), heads, 1)
    assert torch.equal(keys, before_keys) and torch.equal(values, before_values)


def test_reference_is_the_decoders_unfused_rotation_and_cache_write():
    batch, kv_heads, group, half, slots, slot = 2, 2, 3, 4, 5, 3
    qkv, cos, sin, keys, values, slot_tensor, heads = inputs(batch, kv_heads, group, half, slots, slot,
                                                             torch.float32, 0)
    before_keys, before_values = keys.clone(), values.clone()
    query = rotate_into_cache_reference(qkv, cos, sin, keys, values, slot_tensor, heads, kv_heads)
    q, k, v = qkv.view(batch, 1, heads + 2 * kv_heads, 2 * half).split([heads, kv_heads, kv_heads], dim=2)
    torch.testing.assert_close(query, rotate(q, cos[:, None, None], sin[:, None, None])[:, 0])
    torch.testing.assert_close(keys[:, :, slot], rotate(k, cos[:, None, None], sin[:, None, None])[:, 0])
    torch.testing.assert_close(values[:, :, slot], v[:, 0])
    others = [index for index in range(slots) if index != slot]
    assert torch.equal(keys[:, :, others], before_keys[:, :, others])
    assert torch.equal(values[:, :, others], before_values[:, :, others])


def test_bad_shapes_name_what_was_expected():
    qkv, cos, sin, keys, values, slot, heads = inputs(1, 2, 2, 4, 5, 0, torch.float32, 0)
    with pytest.raises(ValueError, match=r"qkv must have shape \(B, \(N \+ 2K\) \* E\) = \(1, 64\), found \(1, 63\)"):
        rotate_into_cache(qkv[:, :63], cos, sin, keys, values, slot, heads, 2)
    with pytest.raises(ValueError, match=r"the cache holds 2 key/value heads, expected num_kv_heads=1"):
        rotate_into_cache(qkv, cos, sin, keys, values, slot, heads, 1)
    with pytest.raises(ValueError, match=r"slot must be a \(1,\) int64 tensor"):
        rotate_into_cache(qkv, cos, sin, keys, values, slot.float(), heads, 2)
    with pytest.raises(ValueError, match=r"cos must have shape \(B, E\) = \(1, 8\), found \(1, 6\)"):
        rotate_into_cache(qkv, cos[:, :6], sin, keys, values, slot, heads, 2)


@given(batch=st.integers(2, 4), kv_heads=st.integers(1, 2), group=st.integers(1, 3), half=st.integers(1, 16),
       strided=st.sampled_from(["cos", "signed_sin", "qkv"]), seed=st.integers(0, 2**16))
def test_tables_and_projection_rows_may_have_different_strides(kernel_device, batch, kv_heads, group,  # noqa: F811
                                                               half, strided, seed):
    """One of qkv, cos and signed_sin a strided view (rows of another tensor), the others contiguous."""
    qkv, cos, sin, keys, values, slot, heads = inputs(batch, kv_heads, group, half, 5, 2, torch.float32, seed,
                                                      kernel_device)
    tensors = {"qkv": qkv, "cos": cos, "signed_sin": sin}
    wide = torch.zeros(batch, 3 * tensors[strided].shape[1], device=kernel_device)
    wide[:, 1:1 + tensors[strided].shape[1]] = tensors[strided]
    tensors[strided] = wide[:, 1:1 + tensors[strided].shape[1]]
    expected_keys, expected_values = keys.clone(), values.clone()
    expected = rotate_into_cache_reference(qkv, cos, sin, expected_keys, expected_values, slot, heads, kv_heads)
    found = rotate_into_cache_triton(tensors["qkv"], tensors["cos"], tensors["signed_sin"], keys, values, slot, heads,
                                     kv_heads)
    torch.testing.assert_close(found, expected, **TOLERANCES[torch.float32])
    torch.testing.assert_close(keys, expected_keys, **TOLERANCES[torch.float32])
    torch.testing.assert_close(values, expected_values, rtol=0, atol=0)
