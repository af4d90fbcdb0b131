"""The native Qwen2 backbone against transformers' Qwen2 with the same random weights."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import Qwen2Config, Qwen2ForCausalLM

from nextstep.backbones import Qwen2Backbone, Qwen2BackboneConfig, positions_from_mask
from nextstep.heads import LMHead


def pair(num_heads, num_kv_heads, head_dim, layers=2, backend="sdpa", seed=0):
    hidden = num_heads * head_dim
    hf_config = Qwen2Config(
        vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, rope_theta=10000.0,
        rms_norm_eps=1e-6, max_position_embeddings=256, tie_word_embeddings=False,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    reference = Qwen2ForCausalLM(hf_config).eval()
    ours = Qwen2Backbone(Qwen2BackboneConfig(
        vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, num_layers=layers,
        num_heads=num_heads, num_kv_heads=num_kv_heads, rope_theta=10000.0, rms_norm_eps=1e-6,
        attention_backend=backend)).eval()
    state = {k.removeprefix("model."): v for k, v in reference.state_dict().items() if k.startswith("model.")}
    ours.load_state_dict(state, strict=True)
    head = LMHead(hidden, 128)
    head.weight.data.copy_(reference.lm_head.weight)
    return reference, ours, head


@settings(max_examples=10, deadline=None)
@given(heads=st.sampled_from([(2, 1), (4, 2), (4, 4), (6, 2)]), head_dim=st.sampled_from([8, 16]),
       length=st.integers(1, 12), backend=st.sampled_from(["sdpa", "eager"]))
def test_prefill_matches_transformers(heads, head_dim, length, backend):
    reference, ours, head = pair(*heads, head_dim, backend=backend)
    ids = torch.randint(0, 128, (2, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        expected = reference(ids, output_hidden_states=True)
        hidden = ours(ours.embed(ids), torch.arange(length).expand(2, length))
    torch.testing.assert_close(hidden, expected.hidden_states[-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head(hidden), expected.logits, atol=1e-5, rtol=1e-5)


def test_sixteen_cached_decode_steps_match_transformers():
    reference, ours, head = pair(4, 2, 16)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).logits
        cache = ours.new_cache(2, 24)
        positions = torch.arange(24).expand(2, 24)
        logits = [head(ours(ours.embed(ids[:, :8]), positions[:, :8], cache=cache))]
        for i in range(8, 24):
            logits.append(head(ours(ours.embed(ids[:, i:i + 1]), positions[:, i:i + 1], cache=cache)))
    torch.testing.assert_close(torch.cat(logits, 1), expected, atol=1e-5, rtol=1e-5)


def test_left_padded_batch_matches_transformers_attention_mask():
    reference, ours, head = pair(4, 2, 8)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, :4] = False
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask.long(), position_ids=positions_from_mask(mask)).logits
        logits = head(ours(ours.embed(ids), positions_from_mask(mask), mask))
    torch.testing.assert_close(logits[mask], expected[mask], atol=1e-5, rtol=1e-5)


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
