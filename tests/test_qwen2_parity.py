"""The native Qwen2 backbone against transformers' Qwen2 with the same random weights.

Hypothesis draws the shapes (heads, key/value heads dividing them, head dims,
lengths); the oracle is a tiny random ``Qwen2ForCausalLM``.
"""

import inspect

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from nextstep.backbones import Qwen2Backbone, Qwen2BackboneConfig, positions_from_mask
from nextstep.heads import LMHead

VOCAB = 96


def pair(num_heads, num_kv_heads, head_dim, layers=2, backend="sdpa", seed=0, hidden=None):
    """transformers' Qwen2ForCausalLM and our backbone + LM head holding the same weights."""
    hidden = hidden or num_heads * head_dim
    ours_config = Qwen2BackboneConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_layers=layers,
        num_heads=num_heads, num_kv_heads=num_kv_heads,
        head_dim=None if hidden == num_heads * head_dim else head_dim,
        rope_theta=10000.0, rms_norm_eps=1e-6, attention_backend=backend)
    fields = ours_config.to_hf_config()
    fields.pop("model_type")
    torch.manual_seed(seed)
    reference = Qwen2ForCausalLM(Qwen2Config(**fields, attn_implementation="eager")).eval()
    # Random (not the default ones) norm gains, so that the norms are exercised too.
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
    ours = Qwen2Backbone(ours_config).eval()
    state = {k.removeprefix("model."): v for k, v in reference.state_dict().items() if k.startswith("model.")}
    ours.load_state_dict(state, strict=True)
    head = LMHead(hidden, VOCAB)
    head.weight.data.copy_(reference.lm_head.weight)
    return reference, ours, head


def hf_cache(reference):
    try:
        return DynamicCache(config=reference.config)
    except TypeError:  # older transformers
        return DynamicCache()


def with_cache(reference, cache):
    """transformers' cache keyword: ``cache`` in 5.x, ``past_key_values`` before."""
    name = "cache" if "cache" in inspect.signature(reference.model.forward).parameters else "past_key_values"
    return {name: cache, "use_cache": True}


shapes = st.sampled_from([(1, 1), (2, 1), (2, 2), (4, 1), (4, 2), (4, 4), (6, 2), (6, 3), (8, 2)])


@settings(max_examples=12, deadline=None)
@given(heads=shapes, head_dim=st.sampled_from([4, 8, 16]), length=st.integers(1, 12),
       backend=st.sampled_from(["sdpa", "eager"]), batch=st.integers(1, 3))
def test_prefill_matches_transformers(heads, head_dim, length, backend, batch):
    reference, ours, head = pair(*heads, head_dim, backend=backend)
    ids = torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        expected = reference(ids, output_hidden_states=True)
        hidden = ours(ours.embed(ids), torch.arange(length).expand(batch, length))
    torch.testing.assert_close(hidden, expected.hidden_states[-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head(hidden), expected.logits, atol=1e-5, rtol=1e-5)


@settings(max_examples=8, deadline=None)
@given(heads=shapes, head_dim=st.sampled_from([4, 8, 16]), prompt=st.integers(1, 8),
       backend=st.sampled_from(["sdpa", "eager"]))
def test_sixteen_cached_decode_steps_match_transformers(heads, head_dim, prompt, backend):
    """Prefill, then 16 one-token steps, each against transformers' own cached decoding."""
    reference, ours, head = pair(*heads, head_dim, backend=backend)
    total = prompt + 16
    ids = torch.randint(0, VOCAB, (2, total), generator=torch.Generator().manual_seed(prompt))
    positions = torch.arange(total).expand(2, total)
    with torch.no_grad():
        cache, theirs = ours.new_cache(2, total), hf_cache(reference)
        ours_hidden = [ours(ours.embed(ids[:, :prompt]), positions[:, :prompt], None, cache)]
        their_out = [reference.model(ids[:, :prompt], **with_cache(reference, theirs)).last_hidden_state]
        for i in range(prompt, total):
            ours_hidden.append(ours(ours.embed(ids[:, i:i + 1]), positions[:, i:i + 1],
                                    torch.ones(2, 1, dtype=torch.bool), cache))
            their_out.append(reference.model(ids[:, i:i + 1], **with_cache(reference, theirs))
                             .last_hidden_state)
        full_logits = reference(ids).logits
    hidden, expected = torch.cat(ours_hidden, 1), torch.cat(their_out, 1)
    torch.testing.assert_close(hidden, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head(hidden), full_logits, atol=1e-5, rtol=1e-5)


def test_explicit_head_dim_matches_transformers():
    """head_dim != hidden_size / num_heads, as some Qwen-family checkpoints have."""
    reference, ours, head = pair(4, 2, 16, hidden=48)
    assert ours.config.head_dim == 16
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(ids).logits
        logits = head(ours(ours.embed(ids), torch.arange(9).expand(2, 9)))
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


@settings(max_examples=6, deadline=None)
@given(padding=st.integers(1, 5), backend=st.sampled_from(["sdpa", "eager"]))
def test_left_padded_batch_matches_transformers_attention_mask(padding, backend):
    reference, ours, head = pair(4, 2, 8, backend=backend)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(padding))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, :padding] = False
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask.long(), position_ids=positions_from_mask(mask)).logits
        logits = head(ours(ours.embed(ids), positions_from_mask(mask), mask))
        alone = head(ours(ours.embed(ids[1:, padding:]), torch.arange(9 - padding)[None]))
    torch.testing.assert_close(logits[mask], expected[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1, padding:], alone[0], atol=1e-5, rtol=1e-5)


def test_left_padded_cached_decode_matches_transformers():
    """A left-padded prompt, then cached steps with a growing attention mask, as generation decodes."""
    reference, ours, head = pair(4, 2, 8)
    prompt_mask = torch.tensor([[True] * 6, [False] * 2 + [True] * 4])
    ids = torch.randint(0, VOCAB, (2, 6 + 5), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cache, theirs = ours.new_cache(2, 11), hf_cache(reference)
        positions = positions_from_mask(prompt_mask)
        hidden = [ours(ours.embed(ids[:, :6]), positions, prompt_mask, cache)[:, -1:]]
        expected = [reference.model(ids[:, :6], attention_mask=prompt_mask.long(), position_ids=positions,
                                    **with_cache(reference, theirs)).last_hidden_state[:, -1:]]
        mask, step_positions = prompt_mask, positions[:, -1:] + 1
        for i in range(6, 11):
            step_mask = torch.ones(2, 1, dtype=torch.bool)
            mask = torch.cat([mask, step_mask], 1)
            hidden.append(ours(ours.embed(ids[:, i:i + 1]), step_positions, step_mask, cache))
            expected.append(reference.model(ids[:, i:i + 1], attention_mask=mask.long(), position_ids=step_positions,
                                            **with_cache(reference, theirs)).last_hidden_state)
            step_positions = step_positions + 1
    torch.testing.assert_close(torch.cat(hidden, 1), torch.cat(expected, 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_tracks_transformers(dtype):
    """In bf16/fp16 both implementations round differently; they stay within half-precision noise."""
    reference, ours, head = pair(4, 2, 16)
    reference.to(dtype)
    ours.to(dtype)
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference.model(ids).last_hidden_state.float()
        hidden = ours(ours.embed(ids), torch.arange(10).expand(2, 10)).float()
        cache = ours.new_cache(2, 10)
        steps = [ours(ours.embed(ids[:, :4]), torch.arange(4).expand(2, 4), None, cache)]
        for i in range(4, 10):
            steps.append(ours(ours.embed(ids[:, i:i + 1]), torch.full((2, 1), i), None, cache))
    assert hidden.dtype == torch.float32 and ours.rotary.signed_frequencies.dtype == torch.float32
    scale = expected.abs().max()
    assert (hidden - expected).abs().max() < 0.03 * scale
    assert (torch.cat(steps, 1).float() - hidden).abs().max() < 0.03 * scale


def test_backends_agree():
    _, sdpa, _ = pair(4, 2, 8, backend="sdpa")
    _, eager, _ = pair(4, 2, 8, backend="eager")
    embeds = torch.randn(2, 7, 32)
    mask = torch.tensor([[True] * 7, [False] * 2 + [True] * 5])
    with torch.no_grad():
        torch.testing.assert_close(sdpa(embeds, positions_from_mask(mask), mask),
                                   eager(embeds, positions_from_mask(mask), mask), atol=1e-5, rtol=1e-5)


def test_mismatched_checkpoint_names_the_key():
    _, ours, _ = pair(4, 2, 8)
    state = ours.state_dict()
    state["layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(RuntimeError, match="q_proj"):
        ours.load_state_dict(state)
