import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nextstep import ByteTextTokenizer, SequenceBuilder
from nextstep.sequence import Example, SequenceBatch

TOKEN_DIM = 4
builder = SequenceBuilder(ByteTextTokenizer(), TOKEN_DIM)
tok = builder.text_tokenizer
grids = st.integers(1, 40)


@given(text=st.text(max_size=40), h=grids, w=grids)
def test_prompt_parse_round_trip(text, h, w):
    ids = builder.prompt(text, h, w)
    assert builder.parse(ids) == (text, h, w)
    assert ids[-1] == tok.begin_of_image_id
    assert tok.decode(ids) == f"{text}<|image_area|>{h}*{w}<|begin_of_image|>"


@given(text=st.text(max_size=30), h=st.integers(1, 6), w=st.integers(1, 6), image_first=st.booleans())
def test_example_layout(text, h, w, image_first):
    tokens = torch.randn(h * w, TOKEN_DIM)
    example = builder.example(text, tokens, h, w, image_first=image_first)
    ids = example.input_ids
    span = ids[example.image_start: example.image_start + h * w]
    assert span == [tok.image_placeholder_id] * (h * w)
    assert ids[example.image_start - 1] == tok.begin_of_image_id
    assert ids[example.image_start + h * w] == tok.end_of_image_id
    assert ids[-1] == tok.eos_id
    expected = (
        f"<|image_area|>{h}*{w}<|begin_of_image|>" + "<|image_placeholder|>" * (h * w)
        + f"<|end_of_image|>{text}<|endoftext|>"
        if image_first else
        f"{text}<|image_area|>{h}*{w}<|begin_of_image|>" + "<|image_placeholder|>" * (h * w)
        + "<|end_of_image|><|endoftext|>"
    )
    assert tok.decode(ids) == expected
    if not image_first:
        assert builder.parse(ids) == (text, h, w)


@given(sizes=st.lists(st.tuples(st.text(max_size=12), st.integers(1, 3), st.integers(1, 3)),
                      min_size=1, max_size=4))
def test_collate_masks(sizes):
    examples = [builder.example(t, torch.randn(h * w, TOKEN_DIM), h, w) for t, h, w in sizes]
    batch = builder.collate(examples)
    length = max(len(e.input_ids) for e in examples)
    assert batch.input_ids.shape == (len(examples), length)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        assert batch.attention_mask[row].sum() == n
        assert batch.input_ids[row, :n].tolist() == example.input_ids
        assert (batch.input_ids[row, n:] == tok.pad_id).all()
        count = example.image_tokens.shape[0]
        assert batch.image_mask[row].sum() == count
        torch.testing.assert_close(batch.image_tokens[row][batch.image_mask[row]], example.image_tokens)
        # Text targets: every real non-image token except the first.
        assert not batch.text_target_mask[row, 0]
        assert batch.text_target_mask[row].sum() == n - count - 1
        assert not (batch.text_target_mask[row] & batch.image_mask[row]).any()


def test_left_pad():
    ids, mask = builder.left_pad([[1, 2, 3], [4]])
    assert ids.tolist() == [[1, 2, 3], [tok.pad_id, tok.pad_id, 4]]
    assert mask.tolist() == [[True, True, True], [False, False, True]]


def test_bad_inputs():
    with pytest.raises(ValueError, match="shape"):
        builder.example("x", torch.randn(3, TOKEN_DIM), 2, 2)
    with pytest.raises(ValueError, match="grid height"):
        builder.prompt("x", 0, 2)
    with pytest.raises(ValueError, match="image prefix"):
        builder.parse(tok.encode("no image here"))
    with pytest.raises(ValueError, match="empty"):
        builder.collate([])
    for side in (True, 1.5, "2"):
        with pytest.raises(ValueError, match=rf"grid width must be a positive integer, found {type(side).__name__}"):
            builder.prompt("x", 2, side)
    assert builder.prompt("x", np.int64(2), torch.tensor(3)) == builder.prompt("x", 2, 3)
    for bad in (-1, tok.vocab_size):
        with pytest.raises(ValueError, match=rf"id {bad} is outside the byte tokenizer's vocabulary of "
                                             rf"{tok.vocab_size}"):
            tok.decode([97, bad])


def test_examples_whose_images_do_not_sit_on_placeholders_are_refused():
    """A hand-built example's image must cover placeholder ids inside it, after its first id: otherwise its
    loss lands on padding or on a packed neighbour, or is predicted from the sequence before it."""
    good = builder.example("a long caption", torch.randn(4, TOKEN_DIM), 2, 2)
    placeholder = tok.image_placeholder_id
    cases = [
        (Example([1, 2, 3], torch.randn(4, TOKEN_DIM), 3), r"image span 3..7 must lie within its 3 ids"),
        (Example([placeholder] * 4 + [5], torch.randn(4, TOKEN_DIM), 0),
         r"image span 0..4 must lie within its 5 ids and start after the first"),
        (Example([1] * 8, torch.randn(4, TOKEN_DIM), 1), rf"must be <\|image_placeholder\|> \({placeholder}\), "
                                                         r"found \[1, 1, 1, 1\]"),
        (Example([1] + [placeholder] * 4, torch.randn(4, TOKEN_DIM + 1), 1),
         rf"image tokens must have shape \(n, {TOKEN_DIM}\), found \(4, {TOKEN_DIM + 1}\)"),
    ]
    for bad, message in cases:
        for lay_out in (lambda: builder.collate([bad, good]), lambda: builder.pack([bad, good], 100)):
            with pytest.raises(ValueError, match=message):
                lay_out()


def test_an_editing_prompt_places_a_source_of_another_size_after_its_own_prefix():
    """The source image's prefix is that of the source grid, whose text ("2*3") is shorter than the output's."""
    ids, start = builder.editing_prompt("make it blue", (2, 3), 10, 10)
    assert ids[start - 1] == tok.begin_of_image_id
    assert ids[:start] == builder.image_prefix(2, 3)
    assert ids[start:start + 6] == [tok.image_placeholder_id] * 6 and ids[start + 6] == tok.end_of_image_id
    assert tok.decode(ids) == ("<|image_area|>2*3<|begin_of_image|>" + "<|image_placeholder|>" * 6
                               + "<|end_of_image|>make it blue<|image_area|>10*10<|begin_of_image|>")


def test_an_editing_example_with_grids_of_other_sizes_collates_its_images_onto_their_placeholders():
    source, target = torch.randn(6, TOKEN_DIM), torch.randn(100, TOKEN_DIM)
    example = builder.editing_example("make it blue", source, (2, 3), target, (10, 10))
    batch = builder.collate([example])
    row, images, targets = batch.input_ids[0], batch.image_mask[0], batch.image_target_mask[0]
    assert int(images.sum()) == 106 and int(targets.sum()) == 100
    assert (row[images] == tok.image_placeholder_id).all()
    source_slots = torch.nonzero(images & ~targets).flatten()
    assert source_slots.tolist() == list(range(source_slots[0], source_slots[0] + 6))
    assert row[source_slots[0] - 1] == tok.begin_of_image_id and row[source_slots[-1] + 1] == tok.end_of_image_id
    torch.testing.assert_close(batch.image_tokens[0][images & ~targets], source)
    torch.testing.assert_close(batch.image_tokens[0][targets], target)


def test_an_editing_example_closes_its_edited_image_and_ends_the_sequence():
    """An editing example reads source block, instruction, edited-image block, then <|endoftext|>."""
    source, target = torch.randn(2, TOKEN_DIM), torch.randn(4, TOKEN_DIM)
    example = builder.editing_example("make it blue", source, (1, 2), target, (2, 2))
    assert tok.decode(example.input_ids) == (
        "<|image_area|>1*2<|begin_of_image|>" + "<|image_placeholder|>" * 2 + "<|end_of_image|>make it blue"
        + "<|image_area|>2*2<|begin_of_image|>" + "<|image_placeholder|>" * 4 + "<|end_of_image|><|endoftext|>")
    assert example.input_ids[example.image_start - 1] == tok.begin_of_image_id
    assert example.input_ids[example.image_start + 4:] == [tok.end_of_image_id, tok.eos_id]


def test_target_counts_never_count_the_first_position():
    """target_counts: a target is predicted from the position before it, so position 0 of each row is never
    counted, even in a hand-built batch (B 2, L 5) that marks every position."""
    ones = torch.ones(2, 5, dtype=torch.bool)
    batch = SequenceBatch(input_ids=torch.zeros(2, 5, dtype=torch.long), attention_mask=ones, image_mask=ones,
                          image_target_mask=ones, text_target_mask=ones,
                          image_tokens=torch.zeros(2, 5, TOKEN_DIM))
    assert batch.target_counts() == (2 * 4, 2 * 4)


def test_packing_places_the_longest_sequences_first():
    """First-fit decreasing: three 7-token and three 3-token sequences, given short ones first, fill three rows
    of 10 (each a long sequence and a short one) where first fit in input order would need four."""
    tokens = torch.randn(1, TOKEN_DIM)
    short = Example([1, 2, tok.image_placeholder_id], tokens, 2)
    long = Example([1, 2, 3, 4, 5, 6, tok.image_placeholder_id], tokens, 6)
    examples = [short, short, short, long, long, long]
    batch = builder.pack(examples, 10)
    assert batch.input_ids.shape == (3, 10)
    assert batch.attention_mask.all()
    # Each row keeps its sequences in input order: the short one (document 1) before the long one.
    assert batch.document_ids.tolist() == [[1] * 3 + [2] * 7] * 3
    assert int(batch.image_mask.sum()) == 6


def test_a_batch_moved_with_a_dtype_casts_only_its_image_tokens():
    """SequenceBatch.to(device, dtype): image_tokens (B, L, D) take the dtype (values rounded to it); the id
    and mask tensors keep theirs; without a dtype the tokens keep their own."""
    batch = builder.collate([builder.example("ab", torch.randn(4, TOKEN_DIM), 2, 2)])
    moved = batch.to("cpu", torch.bfloat16)
    assert moved.image_tokens.dtype == torch.bfloat16
    assert torch.equal(moved.image_tokens, batch.image_tokens.to(torch.bfloat16))
    assert moved.input_ids.dtype == torch.long and moved.attention_mask.dtype == torch.bool
    assert batch.to("cpu").image_tokens.dtype == torch.float32


def test_collate_keeps_the_dtype_of_the_image_tokens():
    """Examples with bfloat16 tokens (a bfloat16 latent cache) collate into bfloat16 image_tokens (B, L, D),
    bit for bit, rather than being widened."""
    tokens = torch.randn(4, TOKEN_DIM).to(torch.bfloat16)
    for lay_out in (builder.collate, lambda examples: builder.pack(examples, 100)):
        batch = lay_out([builder.example("ab", tokens, 2, 2)])
        assert batch.image_tokens.dtype == torch.bfloat16
        assert torch.equal(batch.image_tokens[batch.image_mask], tokens)
