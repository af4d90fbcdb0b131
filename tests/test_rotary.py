"""Rotary position embedding: the public tables and rotation against the rotate-half (NeoX / Qwen2) layout."""

import torch

from nextstep.layers import RotaryEmbedding, apply_rotary
from nextstep.layers.rotary import rotate

HEAD_DIM = 8


def neox_rotary(x, positions, theta=10000.0):
    """Hand-written reference: ``x * cos + rotate_half(x) * sin`` with ``rotate_half([x1, x2]) = [-x2, x1]`` and
    frequencies ``theta ** (-2i / E)`` repeated over both halves. x (B, heads, L, E), positions (B, L)."""
    dim = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = positions.double()[..., None] * inv_freq  # (B, L, E/2)
    angles = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, L, E)
    first, second = x.double().chunk(2, dim=-1)
    return x.double() * angles.cos() + torch.cat((-second, first), dim=-1) * angles.sin()


def test_rotary_frequencies_default_to_theta_ten_thousand():
    expected = 10000.0 ** (-torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)
    torch.testing.assert_close(RotaryEmbedding(HEAD_DIM).inv_freq.double(), expected)
    assert RotaryEmbedding(HEAD_DIM).theta == 10000.0


def test_apply_rotary_with_the_plain_tables_is_the_rotate_half_rotation():
    rotary = RotaryEmbedding(HEAD_DIM)
    positions = torch.arange(8)[None]  # (1, 8)
    x = torch.randn(1, 2, 8, HEAD_DIM, generator=torch.Generator().manual_seed(0))  # (B, heads, L, E)
    cos, sin = rotary(positions, torch.float32)
    found = apply_rotary(x, cos, sin)
    torch.testing.assert_close(found.double(), neox_rotary(x, positions), atol=1e-5, rtol=1e-5)
    # The first frequency is 1: at position 1, the unit vector e_0 turns to cos(1) e_0 + sin(1) e_{E/2}.
    unit = torch.zeros(1, 1, 1, HEAD_DIM)
    unit[..., 0] = 1.0
    cos, sin = rotary(torch.tensor([[1]]), torch.float32)
    expected = torch.zeros(HEAD_DIM)
    expected[0], expected[HEAD_DIM // 2] = torch.cos(torch.tensor(1.0)), torch.sin(torch.tensor(1.0))
    torch.testing.assert_close(apply_rotary(unit, cos, sin)[0, 0, 0], expected)


def test_apply_rotary_and_the_backbones_signed_rotation_agree():
    rotary = RotaryEmbedding(HEAD_DIM)
    positions = torch.arange(8)[None]
    x = torch.randn(1, 3, 8, HEAD_DIM, generator=torch.Generator().manual_seed(1))  # (B, heads, L, E)
    plain = apply_rotary(x, *rotary(positions, torch.float32))
    cos, signed_sin = rotary.signed_tables(positions, torch.float32)  # (B, L, E)
    signed = rotate(x, cos[:, None], signed_sin[:, None])
    torch.testing.assert_close(plain, signed, atol=1e-6, rtol=1e-6)


def test_rotated_dot_products_depend_only_on_the_distance_between_positions():
    rotary = RotaryEmbedding(HEAD_DIM)
    generator = torch.Generator().manual_seed(2)
    query = torch.randn(1, 1, 1, HEAD_DIM, generator=generator)
    key = torch.randn(1, 1, 1, HEAD_DIM, generator=generator)

    def score(query_position, key_position):
        q = apply_rotary(query, *rotary(torch.tensor([[query_position]]), torch.float32))
        k = apply_rotary(key, *rotary(torch.tensor([[key_position]]), torch.float32))
        return (q * k).sum()

    torch.testing.assert_close(score(5, 2), score(3, 0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(score(7, 7), (query * key).sum(), atol=1e-5, rtol=1e-5)
