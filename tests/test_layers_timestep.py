"""The sinusoidal time code: its width is the width asked for, odd widths included."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from nextstep.layers.timestep import TimestepEmbedder, sinusoidal_embedding


@given(half=st.integers(1, 16), seed=st.integers(0, 2**16))
def test_an_odd_width_is_the_even_code_and_one_zero_column(half, seed):
    t = torch.rand(5, generator=torch.Generator().manual_seed(seed))
    odd = sinusoidal_embedding(t, 2 * half + 1)
    assert odd.shape == (5, 2 * half + 1)
    torch.testing.assert_close(odd[:, :-1], sinusoidal_embedding(t, 2 * half))
    assert bool((odd[:, -1] == 0).all())


def test_an_embedder_with_an_odd_frequency_width_embeds_times():
    embedder = TimestepEmbedder(8, frequency_dim=7)
    assert embedder(torch.tensor([0.0, 0.5, 1.0])).shape == (3, 8)
