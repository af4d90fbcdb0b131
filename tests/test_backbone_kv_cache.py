"""The static KV cache: prefill and decode, left padding, cropping, fan-out to CFG branches, errors."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nextstep.backbones import KVCache, Qwen2Backbone, Qwen2BackboneConfig, positions_from_mask
from nextstep.backbones.masks import attention_mask_for, visible_keys


def backbone(layers=2, heads=(4, 2), backend="sdpa", seed=0):
    torch.manual_seed(seed)
    config = Qwen2BackboneConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=layers,
                                 num_heads=heads[0], num_kv_heads=heads[1], attention_backend=backend)
    model = Qwen2Backbone(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
    return model


def run_in_chunks(model, embeds, positions, mask, chunks, capacity=None):
    """Feed ``embeds`` through one cache in chunks of the given sizes; returns the concatenated hidden states."""
    cache = model.new_cache(embeds.shape[0], capacity or embeds.shape[1])
    out, start = [], 0
    for size in chunks:
        end = start + size
        out.append(model(embeds[:, start:end], positions[:, start:end], mask[:, start:end], cache))
        start = end
    return torch.cat(out, 1), cache


@settings(max_examples=15, deadline=None)
@given(data=st.data(), length=st.integers(2, 14), padding=st.integers(0, 4), backend=st.sampled_from(["sdpa", "eager"]))
def test_any_chunking_equals_the_full_forward(data, length, padding, backend):
    """Prefill + decode in arbitrary chunk sizes, with a left-padded row, equals one uncached pass."""
    model = backbone(backend=backend)
    padding = min(padding, length - 1)
    chunks, left = [], length
    while left:
        chunks.append(data.draw(st.integers(1, left)))
        left -= chunks[-1]
    embeds = torch.randn(2, length, 32, generator=torch.Generator().manual_seed(length))
    mask = torch.ones(2, length, dtype=torch.bool)
    mask[1, :padding] = False
    positions = positions_from_mask(mask)
    with torch.no_grad():
        full = model(embeds, positions, mask)
        chunked, cache = run_in_chunks(model, embeds, positions, mask, chunks, capacity=length + 3)
    torch.testing.assert_close(chunked[mask], full[mask], atol=1e-5, rtol=1e-5)
    assert cache.length == length
    assert torch.equal(cache.key_mask[:, :length], mask)


def test_left_padded_rows_equal_rows_alone_through_decoding():
    model = backbone()
    long, short = torch.randn(1, 6, 32), torch.randn(1, 3, 32)
    steps = torch.randn(2, 4, 32)
    padded = torch.cat([long, torch.cat([torch.zeros(1, 3, 32), short], 1)])
    mask = torch.tensor([[True] * 6, [False] * 3 + [True] * 3])
    with torch.no_grad():
        cache = model.new_cache(2, 10)
        positions = positions_from_mask(mask)
        model(padded, positions, mask, cache)
        batch = [model(steps[:, i:i + 1], positions[:, -1:] + 1 + i, torch.ones(2, 1, dtype=torch.bool), cache)
                 for i in range(4)]
        alone = []
        for row, prompt in enumerate((long, short)):
            row_cache = model.new_cache(1, 10)
            model(prompt, torch.arange(prompt.shape[1])[None], None, row_cache)
            alone.append(torch.cat([model(steps[row:row + 1, i:i + 1], torch.tensor([[prompt.shape[1] + i]]),
                                          None, row_cache) for i in range(4)], 1))
    torch.testing.assert_close(torch.cat(batch, 1), torch.cat(alone), atol=1e-5, rtol=1e-5)


def test_crop_reuses_a_prompt_prefix():
    model = backbone()
    prefix, first, second = torch.randn(2, 5, 32), torch.randn(2, 3, 32), torch.randn(2, 4, 32)
    positions = torch.arange(9).expand(2, 9)
    with torch.no_grad():
        cache = model.new_cache(2, 9)
        model(prefix, positions[:, :5], None, cache)
        model(first, positions[:, 5:8], None, cache)
        cache.crop(5)
        reused = model(second, positions[:, 5:9], None, cache)
        fresh = model(torch.cat([prefix, second], 1), positions)[:, 5:]
    torch.testing.assert_close(reused, fresh, atol=1e-5, rtol=1e-5)
    assert cache.length == 9


def test_select_rows_fans_a_prompt_out_to_cfg_branches():
    """One prefilled prompt, duplicated for two branches that then diverge, equals two separate runs."""
    model = backbone()
    prompt = torch.randn(1, 5, 32)
    branch_tokens = torch.randn(2, 3, 32)
    with torch.no_grad():
        shared = model.new_cache(1, 8)
        model(prompt, torch.arange(5)[None], None, shared)
        branches = shared.select_rows([0, 0])
        assert branches.batch_size == 2 and branches.length == 5
        fanned = torch.cat([model(branch_tokens[:, i:i + 1], torch.full((2, 1), 5 + i), None, branches)
                            for i in range(3)], 1)
        separate = torch.cat([model(torch.cat([prompt, branch_tokens[b:b + 1]], 1), torch.arange(8)[None])[:, 5:]
                              for b in range(2)])
    torch.testing.assert_close(fanned, separate, atol=1e-5, rtol=1e-5)
    assert shared.length == 5, "the source cache is untouched"


def test_batched_cfg_layout_of_generation():
    """Conditional rows then unconditional rows of another prompt length, left-padded, decoded together."""
    model = backbone()
    cond, uncond = torch.randn(2, 6, 32), torch.randn(1, 2, 32)
    rows = torch.cat([cond, torch.cat([torch.zeros(1, 4, 32), uncond], 1).expand(2, 6, 32)])  # (G*R, P, H)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[2:, :4] = False
    tokens = torch.randn(2, 3, 32)
    with torch.no_grad():
        cache = model.new_cache(4, 9)
        positions = positions_from_mask(mask)
        model(rows, positions, mask, cache)
        next_positions = positions[:, -1:] + 1
        batched = []
        for i in range(3):
            step = tokens[:, i:i + 1].repeat(2, 1, 1)  # the same token for both branches of an image
            batched.append(model(step, next_positions + i, torch.ones(4, 1, dtype=torch.bool), cache))
        batched = torch.cat(batched, 1)
        for row, prompt in enumerate([cond[0:1], cond[1:2], uncond, uncond]):
            sequence = torch.cat([prompt, tokens[row % 2:row % 2 + 1]], 1)
            alone = model(sequence, torch.arange(sequence.shape[1])[None])[:, -3:]
            torch.testing.assert_close(batched[row], alone[0], atol=1e-5, rtol=1e-5)


def test_padding_tokens_in_decode_steps_are_never_attended():
    model = backbone()
    prompt, tokens = torch.randn(1, 4, 32), torch.randn(1, 3, 32)
    with torch.no_grad():
        cache = model.new_cache(1, 8)
        model(prompt, torch.arange(4)[None], None, cache)
        # A padding step in between (say, a row that already finished) must change nothing.
        model(torch.randn(1, 1, 32) * 100, torch.tensor([[4]]), torch.tensor([[False]]), cache)
        with_gap = torch.cat([model(tokens[:, i:i + 1], torch.tensor([[4 + i]]), None, cache) for i in range(3)], 1)
        reference = model(torch.cat([prompt, tokens], 1), torch.arange(7)[None])[:, 4:]
    torch.testing.assert_close(with_gap, reference, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(cache.keys).all() and torch.isfinite(cache.values).all()


def test_a_sequence_longer_than_the_cache_is_refused():
    model = backbone()
    cache = model.new_cache(2, 4)
    with torch.no_grad():
        model(torch.randn(2, 3, 32), torch.arange(3).expand(2, 3), None, cache)
        with pytest.raises(ValueError, match="does not fit the cache of 4"):
            model(torch.randn(2, 2, 32), torch.arange(3, 5).expand(2, 2), None, cache)
    assert cache.length == 3, "a refused call changes nothing"


def test_cache_mismatches_are_refused():
    model = backbone()
    embeds, positions = torch.randn(2, 3, 32), torch.arange(3).expand(2, 3)
    with pytest.raises(ValueError, match="batch of 2 rows does not match the cache's 3 rows"):
        model(embeds, positions, None, model.new_cache(3, 8))
    with pytest.raises(ValueError, match="cache dtype"):
        model(embeds, positions, None, model.new_cache(2, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="layers"):
        model(embeds, positions, None, backbone(layers=3).new_cache(2, 8))
    with pytest.raises(TypeError, match="KVCache"):
        model(embeds, positions, None, object())
    with pytest.raises(ValueError, match="positions must have shape"):
        model(embeds, positions[:, :2])
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        model(embeds, positions, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"embeds must have shape \(B, L, 32\)"):
        model(torch.randn(2, 3, 16), positions)
    with pytest.raises(ValueError, match=r"positions must be integers \(int64 token positions\), found torch.float32"):
        model(embeds, positions + 0.5)
    with pytest.raises(ValueError, match=r"embeds are torch.float64 but the backbone's weights torch.float32; cast"):
        model(embeds.double(), positions)
    with pytest.raises(ValueError, match=r"offset must be an int or have shape \(2,\), one per row, found shape "
                                         r"\(2, 1\)"):
        positions_from_mask(torch.ones(2, 3, dtype=torch.bool), torch.tensor([[4], [5]]))
    with torch.no_grad():
        foreign = KVCache(2, 2, 8, 2, 16)  # head dim 16 where the backbone's is 8
        with pytest.raises(ValueError, match="2 layers x 2 heads x 16 dims, this backbone needs 2 x 2 x 8"):
            model(embeds, positions, None, foreign)
    with pytest.raises(ValueError, match=r"keeps no autograd history: run cached calls under torch.no_grad\(\)"):
        model(embeds, positions, None, model.new_cache(2, 8))


def test_a_step_that_fails_leaves_the_cache_as_it_was(monkeypatch):
    model = backbone()
    cache = model.new_cache(1, 8)
    with torch.no_grad():
        model(torch.randn(1, 3, 32), torch.arange(3)[None], None, cache)
        before = cache.key_mask.clone()

        def broken(*args, **kwargs):
            raise RuntimeError("out of memory")

        monkeypatch.setattr(model, "_run", broken)
        with pytest.raises(RuntimeError, match="out of memory"):
            model(torch.randn(1, 2, 32), torch.arange(3, 5)[None], None, cache)
    assert cache.length == 3 and torch.equal(cache.key_mask, before)


def test_cache_bookkeeping():
    cache = KVCache(2, 3, 8, 2, 4)
    assert (cache.num_layers, cache.batch_size, cache.max_length, cache.length) == (2, 3, 8, 0)
    assert cache.layers[1][0].data_ptr() == cache.keys[1].data_ptr()
    start, end = cache.reserve(torch.tensor([[True, True], [False, True], [True, True]]))
    assert (start, end) == (0, 2)
    cache.commit(end)
    clone = cache.clone()
    clone.keys.fill_(1.0)
    assert cache.keys.abs().sum() == 0, "a clone owns its memory"
    with pytest.raises(ValueError, match="crop to an integer in 0..2"):
        cache.crop(3)
    for length in (True, 1.0, "1"):
        with pytest.raises(ValueError, match=rf"crop to an integer in 0..2 slots, found {type(length).__name__}"):
            cache.crop(length)
    with pytest.raises(ValueError, match="rows must lie in 0..2"):
        cache.select_rows([3])
    for rows, dtype in (([False, True, True], "torch.bool"), ([0.9, 1.7], "torch.float32")):
        with pytest.raises(ValueError, match=rf"rows must be integer indices into the batch, found {dtype}"):
            cache.select_rows(rows)
    assert cache.select_rows(np.array([2, 0])).batch_size == 2  # NumPy and tensor indices alike
    for length in (torch.tensor(True), torch.tensor([1])):  # a 0-d bool, a 1-D tensor
        with pytest.raises(ValueError, match="crop to an integer in 0..2 slots, found Tensor"):
            cache.crop(length)
    cache.crop(np.int64(1))
    cache.crop(torch.tensor(1))
    assert cache.length == 1 and not cache.key_mask[:, 1:].any()
    cache.reset()
    assert cache.length == 0 and not cache.key_mask.any()
    with pytest.raises(ValueError, match="max_length must be an integer >= 1"):
        KVCache(1, 1, 0, 1, 4)
    assert "length=0/8" in repr(cache)


def test_cache_made_in_inference_mode_can_be_cropped_outside_it():
    model = backbone()
    with torch.inference_mode():
        cache = model.new_cache(1, 4)
    with torch.no_grad():
        model(torch.randn(1, 3, 32), torch.arange(3)[None], None, cache)
    cache.crop(1)
    assert cache.length == 1


def test_returned_hidden_states_are_ordinary_tensors():
    """Decoding runs under inference_mode; callers still get tensors they may update in place."""
    model = backbone()
    cache = model.new_cache(1, 2)
    with torch.no_grad():
        hidden = model(torch.randn(1, 1, 32), torch.zeros(1, 1, dtype=torch.long), None, cache)
    assert not hidden.is_inference()
    hidden.mul_(2)


def test_masks_follow_causality_padding_and_own_slot():
    key_mask = torch.tensor([[True, True, True, True], [False, False, True, True]])
    allowed = visible_keys(key_mask, torch.arange(4))
    expected_row1 = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(allowed[0], torch.ones(4, 4, dtype=torch.bool).tril())
    assert torch.equal(allowed[1], expected_row1), "padding queries see only themselves"
    assert torch.equal(attention_mask_for(key_mask, 0, 4)[:, 0], allowed)


def test_left_padded_rows_count_positions_from_their_first_real_token():
    mask = torch.tensor([[False, False, True, True, True], [True, True, True, True, True]])
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert positions_from_mask(mask[:, -1:], offset=mask.sum(-1) - 1).tolist() == [[2], [4]]
    documents = torch.tensor([[1, 1, 2, 2, 2, 0]])  # packed: each document counts from 0; 0 is padding
    assert positions_from_mask(documents).tolist() == [[0, 1, 0, 1, 2, 0]]


def test_a_zero_one_integer_padding_mask_works_with_a_cache_like_the_bool_mask():
    """A Hugging Face style ``attention_mask`` (0/1 int64) is a padding mask, also for cached prefill and decoding."""
    model = backbone()
    embeds, steps = torch.randn(2, 5, 32), torch.randn(2, 2, 32)
    mask = torch.tensor([[True] * 5, [False] * 2 + [True] * 3])
    positions = positions_from_mask(mask)
    runs = []
    with torch.no_grad():
        for prompt_mask, step_mask in ((mask, torch.ones(2, 1, dtype=torch.bool)),
                                       (mask.long(), torch.ones(2, 1, dtype=torch.long))):
            cache = model.new_cache(2, 7)
            hidden = [model(embeds, positions, prompt_mask, cache)]
            hidden += [model(steps[:, i:i + 1], positions[:, -1:] + 1 + i, step_mask, cache) for i in range(2)]
            runs.append(torch.cat(hidden, 1))
            assert torch.equal(cache.key_mask[:, :7], torch.cat([mask, torch.ones(2, 2, dtype=torch.bool)], 1))
    torch.testing.assert_close(runs[1][:, 2:], runs[0][:, 2:], rtol=0, atol=0)
    torch.testing.assert_close(runs[1][0], runs[0][0], rtol=0, atol=0)


def test_a_cached_call_refused_for_gradients_leaves_the_cache_as_it_was():
    """The refusal of a cache while gradients are on claims no slots: length and key_mask (B, T) stay as they were."""
    model = backbone()
    cache = model.new_cache(2, 8)
    with torch.no_grad():
        model(torch.randn(2, 3, 32), torch.arange(3).expand(2, 3), None, cache)
    before = cache.key_mask.clone()
    with pytest.raises(ValueError, match="keeps no autograd history"):
        model(torch.randn(2, 2, 32), torch.arange(3, 5).expand(2, 2), None, cache)
    assert cache.length == 3 and torch.equal(cache.key_mask, before)
    assert not cache.key_mask[:, 3:].any()
