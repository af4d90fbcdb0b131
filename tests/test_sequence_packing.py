"""Packing training sequences into shared rows: the layout, and losses equal to one sequence per row."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from training_helpers import tiny_config, tiny_trainer

from nextstep import build_model
from nextstep.sequence import SequenceBuilder
from nextstep.tokenizers.byte_text import ByteTextTokenizer
from nextstep.training import TextToImageTask, TrainConfig
from nextstep.training.data.base import ImageTextBatch

TOKEN_DIM = 4
builder = SequenceBuilder(ByteTextTokenizer(), TOKEN_DIM)

example_specs = st.lists(st.tuples(st.text(max_size=10), st.integers(1, 3), st.integers(1, 3), st.booleans()),
                         min_size=1, max_size=7)


def make_examples(specs, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [builder.example(text, torch.randn(h * w, TOKEN_DIM, generator=generator), h, w, image_first=first)
            for text, h, w, first in specs]


def placements(batch):
    """(row, start, length) of every packed sequence, in row order."""
    found = []
    for row, ids in enumerate(batch.document_ids.tolist()):
        for number in range(1, max(ids) + 1):
            positions = [i for i, value in enumerate(ids) if value == number]
            assert positions == list(range(positions[0], positions[0] + len(positions)))  # contiguous
            found.append((row, positions[0], len(positions)))
    return found


@given(specs=example_specs, extra=st.integers(0, 40))
def test_every_sequence_is_packed_once_whole_and_within_the_length(specs, extra):
    examples = make_examples(specs)
    longest = max(len(e.input_ids) for e in examples)
    max_length = longest + extra
    packed = builder.pack(examples, max_length)
    single = builder.collate(examples)
    assert packed.input_ids.shape[1] <= max_length
    assert packed.input_ids.shape[0] <= len(examples)
    assert int(packed.attention_mask.sum()) == int(single.attention_mask.sum())
    assert torch.equal(packed.attention_mask, packed.document_ids > 0)
    # Each packed sequence carries one example's ids, masks and tokens unchanged.
    unused = list(range(len(examples)))
    for row, start, length in placements(packed):
        span = slice(start, start + length)
        match = next(i for i in unused if packed.input_ids[row, span].tolist() == examples[i].input_ids
                     and torch.equal(packed.image_tokens[row, span], single.image_tokens[i, :length]))
        unused.remove(match)
        for name in ("image_mask", "image_target_mask", "text_target_mask"):
            assert torch.equal(getattr(packed, name)[row, span], getattr(single, name)[match, :length]), name
    assert unused == []
    # First fit: a row at most half full takes every later sequence that fits, so there is at most one.
    fills = packed.attention_mask.sum(-1).tolist()
    assert sum(2 * fill <= max_length for fill in fills) <= 1


def test_packing_fills_rows_and_numbers_their_sequences():
    examples = make_examples([("ab", 1, 1, False), ("abcdef", 1, 1, False), ("a", 1, 1, True)])
    lengths = [len(e.input_ids) for e in examples]
    packed = builder.pack(examples, lengths[1] + lengths[0])
    assert packed.input_ids.shape == (2, lengths[1] + lengths[0])
    # The longest goes first into row 0, the first example joins it, the third opens row 1.
    assert packed.document_ids[0].tolist() == [1] * lengths[0] + [2] * lengths[1]
    assert packed.document_ids[1].tolist()[:lengths[2]] == [1] * lengths[2]
    assert builder.collate(examples).document_ids is None


def test_bad_packing_requests_are_refused():
    examples = make_examples([("abcdef", 2, 2, False)])
    length = len(examples[0].input_ids)
    with pytest.raises(ValueError, match=f"example 0 has {length} tokens, more than the packing length 5"):
        builder.pack(examples, 5)
    with pytest.raises(ValueError, match="max_length must be an integer >= 1, found 0"):
        builder.pack(examples, 0)
    with pytest.raises(ValueError, match="cannot pack an empty list"):
        builder.pack([], 10)
    with pytest.raises(ValueError, match="pack_length must be None or an integer >= 1"):
        TrainConfig(pack_length=0)


def order_free_head_loss(targets, conditions, generator=None):
    """A deterministic per-target loss, so that the mean does not depend on the order of the targets."""
    return (conditions[:, :targets.shape[1]] - targets).pow(2).mean(-1)


def test_a_packed_batch_has_the_losses_of_one_sequence_per_row(tiny_model):
    model = tiny_model.eval()
    model.image_head.loss = order_free_head_loss
    model_builder = model.sequences
    generator = torch.Generator().manual_seed(0)
    captions = ["a red circle", "two", "a much longer caption than the others", "b"]
    examples = [model_builder.example(caption, torch.randn(4, model.token_dim, generator=generator), 2, 2,
                                      image_first=index % 2 == 1) for index, caption in enumerate(captions)]
    longest = max(len(e.input_ids) for e in examples)
    with torch.no_grad():
        single = model(model_builder.collate(examples))
        for max_length in (longest, 2 * longest, 10 * longest):
            packed_batch = model_builder.pack(examples, max_length)
            packed = model(packed_batch)
            assert (packed.num_text_tokens, packed.num_image_tokens) == (single.num_text_tokens,
                                                                         single.num_image_tokens)
            torch.testing.assert_close(packed.text, single.text, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(packed.image, single.image, atol=1e-5, rtol=1e-5)
        assert packed_batch.input_ids.shape[0] == 1


def test_training_packs_when_the_config_says_so(tmp_path):
    model = build_model("tiny", seed=0)
    task = TextToImageTask.from_train_config(model, tiny_config(pack_length=256, context_noise=0.3))
    assert (task.pack_length, task.context_noise) == (256, 0.3)
    data = ImageTextBatch(keys=["a", "b", "c"], captions=["a red circle", "two squares", "b"],
                          images=torch.rand(3, 3, 32, 32) * 2 - 1)
    packed = task.sequences(data, torch.Generator().manual_seed(0))
    assert packed.input_ids.shape[0] == 1 and packed.document_ids.max() == 3
    assert task.loss(model, data, torch.Generator().manual_seed(0)).loss.isfinite()
    trainer = tiny_trainer(tmp_path, tiny_config(max_steps=3, micro_batch_size=4, pack_length=256,
                                                 context_noise=0.3))
    trainer.fit()
    assert trainer.task.pack_length == 256


@given(text=st.text(max_size=40), room=st.integers(0, 30), first=st.booleans())
def test_an_example_capped_in_length_keeps_its_image_whole_and_the_caption_s_beginning(text, room, first):
    tokens = torch.zeros(4, TOKEN_DIM)
    whole = builder.example(text, tokens, 2, 2, image_first=first)
    image_and_end = len(builder.image_block(2, 2)) + 1
    capped = builder.example(text, tokens, 2, 2, image_first=first, max_length=image_and_end + room)
    caption = builder.text_tokenizer.encode(text)
    assert len(capped.input_ids) == image_and_end + min(room, len(caption))
    kept = caption[:room]
    expected = builder.example("", tokens, 2, 2, image_first=first)
    assert capped.image_start == (expected.image_start if first else expected.image_start + len(kept))
    if room >= len(caption):
        assert capped.input_ids == whole.input_ids


def test_a_capped_example_that_cannot_hold_its_image_is_refused():
    with pytest.raises(ValueError, match=r"a 2x2 image takes \d+ ids with the end of text, more than max_length 3"):
        builder.example("a", torch.zeros(4, TOKEN_DIM), 2, 2, max_length=3)


def test_packed_training_cuts_a_caption_too_long_for_the_packing_length():
    model = build_model("tiny", seed=0)
    task = TextToImageTask.from_train_config(model, tiny_config(pack_length=64))
    data = ImageTextBatch(keys=["a", "b"], captions=["x" * 500, "b"], images=torch.rand(2, 3, 32, 32) * 2 - 1)
    packed = task.sequences(data, torch.Generator().manual_seed(0))
    assert packed.input_ids.shape[1] <= 64
    assert task.loss(model, data, torch.Generator().manual_seed(0)).loss.isfinite()
