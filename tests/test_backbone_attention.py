"""Attention backends: every kernel agrees with the eager reference; xformers only when installed."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nextstep.backbones import (
    ATTENTION_BACKENDS,
    Qwen2Backbone,
    Qwen2BackboneConfig,
    attention_backend,
    positions_from_mask,
    xformers_available,
)
from nextstep.backbones.masks import visible_keys

CPU_BACKENDS = ["sdpa", "eager"]
needs_xformers = pytest.mark.skipif(
    not (xformers_available() and torch.cuda.is_available()),
    reason="xformers (the gpu extra) and a CUDA device are needed for the xformers backend",
)


@settings(max_examples=20, deadline=None)
@given(heads=st.sampled_from([(1, 1), (2, 1), (4, 2), (4, 4), (6, 3), (8, 2)]), head_dim=st.sampled_from([4, 8, 16]),
       queries=st.integers(1, 6), past=st.integers(0, 6), padding=st.integers(0, 3), causal_only=st.booleans())
def test_kernels_agree_with_the_eager_reference(heads, head_dim, queries, past, padding, causal_only):
    num_heads, num_kv_heads = heads
    keys = past + queries
    generator = torch.Generator().manual_seed(keys * 7 + queries)
    q = torch.randn(2, num_heads, queries, head_dim, generator=generator)
    k = torch.randn(2, num_kv_heads, keys, head_dim, generator=generator)
    v = torch.randn(2, num_kv_heads, keys, head_dim, generator=generator)
    if causal_only and past == 0:
        allowed = None
    else:
        key_mask = torch.ones(2, keys, dtype=torch.bool)
        key_mask[1, :min(padding, keys - 1)] = False
        allowed = visible_keys(key_mask, torch.arange(past, keys))
    reference = attention_backend("eager")
    expected = reference(q, k, v, reference.prepare_mask(allowed, q.dtype))
    for name in CPU_BACKENDS:
        backend = attention_backend(name)
        out = backend(q, k, v, backend.prepare_mask(allowed, q.dtype))
        assert out.shape == q.shape
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5, msg=name)


def test_eager_attention_matches_a_hand_computed_example():
    q = torch.tensor([[[[1.0, 0.0]]]])  # (B=1, N=1, L=1, E=2)
    k = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    v = torch.tensor([[[[2.0, 0.0], [0.0, 4.0]]]])
    weights = torch.softmax(torch.tensor([1.0, 0.0]) / 2**0.5, 0)
    expected = weights[0] * v[0, 0, 0] + weights[1] * v[0, 0, 1]
    for name in CPU_BACKENDS:
        backend = attention_backend(name)
        out = backend(q, k, v, backend.prepare_mask(torch.ones(1, 1, 2, dtype=torch.bool), q.dtype))
        torch.testing.assert_close(out[0, 0, 0], expected)


def test_backbones_with_every_backend_agree():
    config = Qwen2BackboneConfig(vocab_size=32, hidden_size=32, intermediate_size=48, num_layers=2,
                                 num_heads=4, num_kv_heads=2)
    torch.manual_seed(0)
    model = Qwen2Backbone(config).eval()
    embeds = torch.randn(2, 6, 32)
    mask = torch.tensor([[True] * 6, [False] * 2 + [True] * 4])
    outputs = {}
    with torch.no_grad():
        for name in CPU_BACKENDS:
            model.set_attention_backend(name)
            assert model.config.attention_backend == name
            cache = model.new_cache(2, 8)
            prefill = model(embeds, positions_from_mask(mask), mask, cache)
            step = model(torch.randn(2, 1, 32, generator=torch.Generator().manual_seed(1)),
                         positions_from_mask(mask)[:, -1:] + 1, None, cache)
            outputs[name] = torch.cat([prefill, step], 1)
    torch.testing.assert_close(outputs["sdpa"][:, 2:], outputs["eager"][:, 2:], atol=1e-5, rtol=1e-5)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        Qwen2BackboneConfig(attention_backend="flash")
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        attention_backend("flash")
    assert set(ATTENTION_BACKENDS) == {"sdpa", "eager", "xformers"}


@pytest.mark.skipif(xformers_available(), reason="xformers is installed here")
def test_xformers_backend_names_the_missing_extra():
    with pytest.raises(ImportError, match=r"nextstep\[gpu\]"):
        attention_backend("xformers")
    config = Qwen2BackboneConfig(vocab_size=32, hidden_size=32, intermediate_size=48, num_layers=1,
                                 num_heads=4, num_kv_heads=2, attention_backend="xformers")
    with pytest.raises(ImportError, match="xformers"):
        Qwen2Backbone(config)


@needs_xformers
@pytest.mark.parametrize("queries, past", [(1, 9), (5, 0), (4, 6)])
def test_xformers_agrees_with_sdpa(queries, past):
    device = torch.device("cuda")
    generator = torch.Generator(device=device).manual_seed(0)
    keys = past + queries
    q = torch.randn(2, 8, queries, 64, device=device, dtype=torch.float16, generator=generator)
    k = torch.randn(2, 2, keys, 64, device=device, dtype=torch.float16, generator=generator)
    v = torch.randn(2, 2, keys, 64, device=device, dtype=torch.float16, generator=generator)
    key_mask = torch.ones(2, keys, dtype=torch.bool, device=device)
    key_mask[1, :2] = False
    allowed = visible_keys(key_mask, torch.arange(past, keys, device=device))
    sdpa, xformers = attention_backend("sdpa"), attention_backend("xformers")
    expected = sdpa(q, k, v, sdpa.prepare_mask(allowed, q.dtype))
    out = xformers(q, k, v, xformers.prepare_mask(allowed, q.dtype))
    torch.testing.assert_close(out, expected, atol=2e-3, rtol=2e-3)
