"""Packed sequences: several documents in one row, attention kept within each, positions restarting."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nextstep.backbones import HFBackbone, HFBackboneConfig, Qwen2Backbone, positions_from_mask
from nextstep.backbones.masks import visible_keys
from nextstep.backbones.qwen2 import Qwen2BackboneConfig
from nextstep.backbones.qwen2_checkpoint import qwen2_config_from_hf

FIELDS = {"model_type": "qwen2", "vocab_size": 90, "hidden_size": 32, "intermediate_size": 48,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6}

documents_per_row = st.lists(st.lists(st.integers(1, 6), min_size=1, max_size=4), min_size=1, max_size=3)


def pack(lengths_per_row, padding=2):
    """Document ids (B, L): row r holds documents of the given lengths, then ``padding`` zeros or more."""
    width = max(sum(lengths) for lengths in lengths_per_row) + padding
    ids = torch.zeros(len(lengths_per_row), width, dtype=torch.long)
    for row, lengths in enumerate(lengths_per_row):
        start = 0
        for number, length in enumerate(lengths, start=1):
            ids[row, start:start + length] = number
            start += length
    return ids


def spans(lengths):
    start = 0
    for length in lengths:
        yield slice(start, start + length)
        start += length


@given(lengths_per_row=documents_per_row)
def test_positions_count_the_earlier_tokens_of_each_document(lengths_per_row):
    documents = pack(lengths_per_row)
    positions = positions_from_mask(documents)
    for row, lengths in enumerate(lengths_per_row):
        for span, length in zip(spans(lengths), lengths):
            assert positions[row, span].tolist() == list(range(length))
        assert (positions[row, sum(lengths):] == 0).all()
    # A 0/1 integer mask is a padding mask: the same positions as the boolean one for real tokens.
    padding = pack([[n] for n in range(1, 4)])
    real = padding.bool()
    assert torch.equal(positions_from_mask(padding)[real], positions_from_mask(real)[real])


@given(lengths_per_row=documents_per_row)
def test_a_token_sees_the_earlier_tokens_of_its_own_document_and_itself(lengths_per_row):
    documents = pack(lengths_per_row)
    length = documents.shape[1]
    allowed = visible_keys(documents, torch.arange(length))
    for row in range(documents.shape[0]):
        for query in range(length):
            for key in range(length):
                same = documents[row, key] == documents[row, query] and documents[row, key] > 0
                expected = (key <= query and bool(same)) or key == query
                assert bool(allowed[row, query, key]) == expected


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@given(lengths_per_row=documents_per_row, seed=st.integers(0, 2**16))
def test_packed_rows_give_each_document_the_hidden_states_it_has_alone(backend, lengths_per_row, seed):
    torch.manual_seed(seed)
    backbone = Qwen2Backbone(Qwen2BackboneConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=2,
                                                 num_heads=4, num_kv_heads=2, attention_backend=backend)).eval()
    documents = pack(lengths_per_row)
    embeds = torch.randn(*documents.shape, 32)
    with torch.no_grad():
        packed = backbone(embeds, positions_from_mask(documents), documents)
        for row, lengths in enumerate(lengths_per_row):
            for span in spans(lengths):
                alone = backbone(embeds[row:row + 1, span], torch.arange(span.stop - span.start)[None])
                torch.testing.assert_close(packed[row:row + 1, span], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_the_adapter_packs_like_the_native_backbone(attention):
    torch.manual_seed(0)
    adapter = HFBackbone(HFBackboneConfig(model_config=FIELDS, attn_implementation=attention)).eval()
    native = Qwen2Backbone(qwen2_config_from_hf(FIELDS)).eval()
    native.load_state_dict(adapter.model.state_dict())
    documents = pack([[3, 4, 2], [6, 1]])
    embeds = torch.randn(*documents.shape, 32)
    positions = positions_from_mask(documents)
    with torch.no_grad():
        from_adapter = adapter(embeds, positions, documents)
        from_native = native(embeds, positions, documents)
        alone = adapter(embeds[:1, 3:7], torch.arange(4)[None])
    real = documents > 0
    torch.testing.assert_close(from_adapter[real], from_native[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(from_adapter[:1, 3:7], alone, atol=1e-5, rtol=1e-5)


def test_documents_cannot_go_into_a_cache():
    backbone = Qwen2Backbone(Qwen2BackboneConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=1,
                                                 num_heads=4, num_kv_heads=2)).eval()
    documents = pack([[2, 3]])
    cache = backbone.new_cache(1, 16)
    with pytest.raises(ValueError, match="document ids above 1 .* need cache=None"):
        backbone(torch.randn(1, documents.shape[1], 32), positions_from_mask(documents), documents, cache)
    with pytest.raises(ValueError, match="must be bool or integer document ids, found torch.float32"):
        backbone(torch.randn(1, 3, 32), torch.arange(3)[None], torch.ones(1, 3))


def test_the_mask_helper_of_custom_backbones_keeps_documents_apart():
    from nextstep.backbones.masks import attention_mask_for

    documents = pack([[2, 3]], padding=1)
    mask = attention_mask_for(documents, 0, documents.shape[1])[:, 0]
    assert torch.equal(mask, visible_keys(documents, torch.arange(documents.shape[1])))
    assert not mask[0, 2, :2].any() and mask[0, 4, 2:5].all()
    padding = torch.tensor([[0, 1, 1]])
    assert torch.equal(attention_mask_for(padding, 0, 3), attention_mask_for(padding.bool(), 0, 3))


@given(lengths_per_row=documents_per_row, start=st.integers(0, 30))
def test_the_mask_helper_for_later_queries_is_those_rows_of_the_full_mask(lengths_per_row, start):
    from nextstep.backbones.masks import attention_mask_for

    documents = pack(lengths_per_row)
    length = documents.shape[1]
    start = min(start, length - 1)
    later = attention_mask_for(documents, start, length - start)
    assert torch.equal(later, attention_mask_for(documents, 0, length)[:, :, start:])
