"""Text from the LM head: cached decoding equals full forwards, batches equal rows alone, stops and bans."""

import pytest
import torch
from PIL import Image

from nextstep import build_model
from nextstep.backbones import positions_from_mask
from nextstep.text_generation import caption_images, complete_text, generate_text
from nextstep.tokenizers.special_tokens import NEXTSTEP_SPECIAL_TOKENS


def image_row(model, tokens, grid_h, grid_w):
    builder = model.sequences
    return builder.image_block(grid_h, grid_w), [(len(builder.image_prefix(grid_h, grid_w)), tokens)]


def greedy_one_token_at_a_time(model, row, new_tokens, banned):
    """Greedy continuation and its log-probability, one uncached forward over the whole sequence per token."""
    ids, spans = row
    ids = list(ids)
    written, total = [], 0.0
    for _ in range(new_tokens):
        sequence = torch.tensor([ids])
        mask = torch.ones_like(sequence, dtype=torch.bool)
        image_mask = torch.zeros_like(mask)
        image_tokens = torch.zeros(1, len(ids), model.token_dim)
        for start, tokens in spans:
            image_mask[0, start:start + tokens.shape[0]] = True
            image_tokens[0, start:start + tokens.shape[0]] = tokens
        hidden = model.backbone(model.embed(sequence, image_mask, image_tokens), positions_from_mask(mask), mask)
        logits = model.lm_head(hidden[:, -1]).float()[0]
        choice = int(logits.masked_fill(banned, float("-inf")).argmax())
        total += float(logits.log_softmax(-1)[choice])
        written.append(choice)
        ids.append(choice)
    return written, total


def default_bans(model):
    tokenizer = model.text_tokenizer
    banned = torch.zeros(model.lm_head.vocab_size, dtype=torch.bool)
    banned[[tokenizer.pad_id, tokenizer.image_placeholder_id]] = True
    banned[tokenizer.vocab_size:] = True
    return banned


def test_greedy_decoding_equals_full_forwards_one_token_at_a_time(trained_like_model):
    model = trained_like_model.eval()
    generator = torch.Generator().manual_seed(0)
    rows = [image_row(model, torch.randn(4, model.token_dim, generator=generator), 2, 2),
            (model.text_tokenizer.encode("a longer text prompt"), []),
            image_row(model, torch.randn(6, model.token_dim, generator=generator), 2, 3)]
    result = generate_text(model, rows, max_new_tokens=6)
    banned = default_bans(model)
    with torch.no_grad():
        for row, ids, log_prob, stopped in zip(rows, result.ids, result.log_probs, result.stopped):
            expected, total = greedy_one_token_at_a_time(model, row, len(ids), banned)
            assert ids == expected
            assert stopped == (ids[-1] == model.text_tokenizer.eos_id)
            assert len(ids) == 6 or stopped
            assert float(log_prob) == pytest.approx(total, abs=1e-4)


def test_a_sampled_batch_writes_what_its_rows_write_alone(trained_like_model):
    model = trained_like_model.eval()
    tokenizer = model.text_tokenizer
    generator = torch.Generator().manual_seed(1)
    rows = [(tokenizer.encode("a"), []), image_row(model, torch.randn(4, model.token_dim, generator=generator), 2, 2),
            (tokenizer.encode("a much longer prompt than the first"), [])]
    settings = dict(max_new_tokens=8, temperature=1.3, top_k=50, top_p=0.95)
    together = generate_text(model, rows, seed=7, **settings)
    for index, row in enumerate(rows):
        alone = generate_text(model, [row], seed=7 + index, **settings)
        assert alone.ids[0] == together.ids[index]
        assert alone.texts[0] == together.texts[index]
        torch.testing.assert_close(alone.log_probs[0], together.log_probs[index], atol=1e-4, rtol=1e-5)
    again = generate_text(model, rows, seed=7, **settings)
    assert again.ids == together.ids
    other = generate_text(model, rows, seed=8, **settings)
    assert other.ids != together.ids


def test_a_row_ends_at_a_stop_id_and_banned_ids_are_never_written(trained_like_model):
    model = trained_like_model.eval()
    tokenizer = model.text_tokenizer
    rows = [(tokenizer.encode("a red circle"), [])]
    first = generate_text(model, rows, max_new_tokens=5).ids[0]
    stopped = generate_text(model, rows, max_new_tokens=5, stop_ids=[first[0]])
    assert stopped.ids == [[first[0]]] and stopped.stopped == [True] and stopped.texts == [""]
    avoided = generate_text(model, rows, max_new_tokens=5, banned_ids=[first[0]])
    assert avoided.ids[0][0] != first[0]
    sampled = generate_text(model, rows * 4, max_new_tokens=12, temperature=5.0)
    written = {i for ids in sampled.ids for i in ids}
    assert not written & {tokenizer.pad_id, tokenizer.image_placeholder_id}
    assert max(written) < tokenizer.vocab_size


def test_completion_stops_where_an_image_would_begin(trained_like_model):
    model = trained_like_model.eval()
    tokenizer = model.text_tokenizer
    prompt = "two"
    first = generate_text(model, [(tokenizer.encode(prompt), [])], max_new_tokens=1).ids[0][0]
    result = complete_text(model, prompt, max_new_tokens=4, stop_ids=[tokenizer.eos_id, first])
    assert result.stopped == [True] and result.ids == [[first]]
    assert model.complete([prompt, "a"], max_new_tokens=3) == complete_text(model, [prompt, "a"],
                                                                             max_new_tokens=3).texts


def test_captioning_reads_the_image_first_and_takes_pil_images_or_tensors(trained_like_model):
    model = trained_like_model.eval()
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    from nextstep.images import to_pil

    pil = to_pil(pixels)
    from_tensor = caption_images(model, pixels, max_new_tokens=5)
    from_pil = caption_images(model, pil, max_new_tokens=5)
    tokens, grid_h, grid_w = model.encode_images(torch.cat([from_pil_tensor(p) for p in pil]))
    rows = [image_row(model, t, grid_h, grid_w) for t in tokens]
    tokenizer = model.text_tokenizer
    stops = [tokenizer.eos_id, tokenizer.image_area_id]  # and no other control token is written
    controls = [tokenizer.special_token_id(name) for name in NEXTSTEP_SPECIAL_TOKENS]
    direct = generate_text(model, rows, max_new_tokens=5, stop_ids=stops,
                           banned_ids=[token for token in controls if token not in stops])
    assert from_pil.ids == direct.ids
    assert len(from_tensor.ids) == 2
    mixed = caption_images(model, [pil[0], Image.new("RGB", (48, 32), "white")], max_new_tokens=3)
    assert mixed.ids[0] == direct.ids[0][:len(mixed.ids[0])]
    assert model.caption(pil, max_new_tokens=5) == from_pil.texts
    # A caption ends where another image would begin, as a completion does.
    area = model.text_tokenizer.image_area_id
    only_area = [i for i in range(model.text_tokenizer.vocab_size) if i != area]
    forced = caption_images(model, pil[:1], max_new_tokens=4, banned_ids=only_area)
    assert forced.ids == [[area]] and forced.stopped == [True]


def from_pil_tensor(image):
    from nextstep.images import from_pil

    return from_pil([image])


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (dict(temperature=-0.5), "temperature must be a finite number >= 0"),
    (dict(top_k=0), "top_k must be an integer >= 1"),
    (dict(top_p=2.0), r"top_p must be a number in \(0, 1\]"),
    (dict(stop_ids=[10**9]), r"stop_ids must be ids in \[0, "),
    (dict(banned_ids=[-1]), r"banned_ids must be ids in \[0, "),
    (dict(seed=None), "seed must be an integer, found NoneType None"),
    (dict(seed=1.5), "seed must be an integer, found float 1.5"),
    (dict(seed=-1), r"seed must be in \[0, 2\*\*63\), found -1"),
])
def test_bad_settings_are_refused_with_what_was_expected(tiny_model, kwargs, message):
    rows = [(tiny_model.text_tokenizer.encode("a"), [])]
    with pytest.raises(ValueError, match=message):
        generate_text(tiny_model, rows, **kwargs)


def test_bad_prompts_are_refused(tiny_model):
    tokenizer = tiny_model.text_tokenizer
    with pytest.raises(ValueError, match="at least one prompt row"):
        generate_text(tiny_model, [])
    with pytest.raises(ValueError, match="every stop id .* is banned"):
        generate_text(tiny_model, [(tokenizer.encode("a"), [])], stop_ids=[tokenizer.eos_id],
                      banned_ids=[tokenizer.eos_id])
    with pytest.raises(ValueError, match="non-empty prompts"):
        complete_text(tiny_model, "")
    with pytest.raises(ValueError, match="every prompt must be a str, found int"):
        complete_text(tiny_model, [3])
    with pytest.raises(ValueError, match="PIL images or a"):
        caption_images(tiny_model, "picture.png")



def test_rows_and_spans_of_another_form_are_named(tiny_model):
    tokenizer = tiny_model.text_tokenizer
    placeholder, dim = tokenizer.image_placeholder_id, tiny_model.token_dim
    ids = tokenizer.encode("a") + [placeholder] * 2
    for rows, message in (
        ([[1, 2, 3]], r"prompt row 0 must be a pair \(ids, spans\)"),
        ([(ids, [(1, torch.zeros(2, dim + 1))])], rf"span tokens must have shape \(n, {dim}\), found \(2, {dim + 1}\)"),
        ([(ids, [(1, torch.zeros(dim))])], rf"span tokens must have shape \(n, {dim}\), found \({dim},\)"),
        ([(ids, [(len(ids) - 1, torch.zeros(2, dim))])], "a span of 2 tokens from .* must cover <|image_placeholder|>"),
        ([(ids, [(0, torch.zeros(2, dim))])], "must cover <|image_placeholder|> ids"),
    ):
        with pytest.raises(ValueError, match=message):
            generate_text(tiny_model, rows, max_new_tokens=1)
    assert generate_text(tiny_model, [(ids, [(len(ids) - 2, torch.zeros(2, dim))])], max_new_tokens=1).ids


def test_stop_ids_none_keeps_the_default_stops_and_empty_writes_every_token(tiny_model):
    tokenizer = tiny_model.text_tokenizer
    written = generate_text(tiny_model, [(tokenizer.encode("a"), [])], max_new_tokens=5, stop_ids=[])
    assert len(written.ids[0]) == 5 and written.stopped == [False]
    # Only <|image_area|> may be written: the default stops of a completion end the row there.
    decodable = min(tiny_model.lm_head.vocab_size, tokenizer.vocab_size)
    banned = [i for i in range(decodable) if i != tokenizer.image_area_id]
    ended = complete_text(tiny_model, "a", max_new_tokens=3, stop_ids=None, banned_ids=banned)
    assert ended.stopped == [True] and ended.ids[0] == [tokenizer.image_area_id]
    image = torch.zeros(1, 3, 32, 32)
    assert caption_images(tiny_model, image, max_new_tokens=3, stop_ids=None, banned_ids=banned).stopped == [True]


def test_a_stopped_row_keeps_its_log_probability_while_others_go_on():
    from nextstep.text_generation import generate_text

    model = build_model("tiny", seed=0).eval()
    tokenizer = model.text_tokenizer
    rows = [(tokenizer.encode(text), []) for text in ("a red circle", "two", "x", "blue squares", "9")]
    firsts = [generate_text(model, [row], max_new_tokens=1).ids[0][0] for row in rows]
    other = next(i for i in range(1, len(rows)) if firsts[i] != firsts[0])
    pair = [rows[0], rows[other]]
    alone = generate_text(model, pair[:1], max_new_tokens=4, stop_ids=[firsts[0]])
    together = generate_text(model, pair, max_new_tokens=4, stop_ids=[firsts[0]])
    assert together.ids[0] == alone.ids[0] == [firsts[0]] and len(together.ids[1]) > 1
    torch.testing.assert_close(together.log_probs[0], alone.log_probs[0], atol=1e-5, rtol=1e-5)


def test_a_row_that_never_stops_keeps_every_written_token_in_its_text():
    """Only a stop id that ended a row is left out of its text; a row cut at max_new_tokens keeps its last token."""
    model = build_model("tiny", seed=0).eval()
    tokenizer = model.text_tokenizer
    rows = [(tokenizer.encode(text), []) for text in ("a red circle", "two squares", "x")]
    written = generate_text(model, rows, max_new_tokens=4, stop_ids=[])
    assert written.stopped == [False] * 3 and all(len(ids) == 4 for ids in written.ids)
    assert written.texts == [tokenizer.decode(ids) for ids in written.ids]


def test_lm_head_classes_past_the_tokenizer_vocabulary_are_never_written():
    """A head padded past the tokenizer (as Qwen2's is) has classes no text decodes: none is ever written."""
    from nextstep.heads.lm_head import LMHead

    model = build_model("tiny", seed=0).eval()
    tokenizer = model.text_tokenizer
    torch.manual_seed(0)
    model.lm_head = LMHead(model.lm_head.hidden_size, tokenizer.vocab_size + 8)
    # Everything decodable but end-of-text banned, and drawn nearly uniformly: end-of-text is all that is left.
    banned = [i for i in range(tokenizer.vocab_size) if i != tokenizer.eos_id]
    rows = [(tokenizer.encode("a"), [])] * 16
    written = generate_text(model, rows, max_new_tokens=1, temperature=50.0, banned_ids=banned)
    assert written.ids == [[tokenizer.eos_id]] * 16
    free = generate_text(model, rows, max_new_tokens=3, temperature=50.0, stop_ids=[])
    assert all(i < tokenizer.vocab_size for ids in free.ids for i in ids)


def test_captions_and_completions_write_no_control_tokens_but_the_stops_unless_told(monkeypatch):
    import nextstep.text_generation as text_generation
    from nextstep.tokenizers.special_tokens import BEGIN_OF_IMAGE, END_OF_IMAGE

    model = build_model("tiny", seed=0)
    tokenizer = model.text_tokenizer
    with torch.no_grad():  # an LM head that always prefers <|begin_of_image|>
        model.lm_head.weight.zero_()
        model.lm_head.weight[tokenizer.special_token_id(BEGIN_OF_IMAGE)] = 1.0
    captions = caption_images(model, [Image.new("RGB", (32, 32), "red")], max_new_tokens=4)
    completions = complete_text(model, ["a red"], max_new_tokens=4)
    for result in (captions, completions):
        assert BEGIN_OF_IMAGE not in result.texts[0] and END_OF_IMAGE not in result.texts[0]
    asked = {}
    monkeypatch.setattr(text_generation, "generate_text", lambda model, rows, **kwargs: asked.update(kwargs))
    caption_images(model, [Image.new("RGB", (32, 32), "red")], banned_ids=())
    assert asked["banned_ids"] == ()  # as given


def test_stop_ids_given_as_a_tensor_are_stops_not_banned(monkeypatch):
    import nextstep.text_generation as text_generation

    model = build_model("tiny", seed=0)
    area = model.text_tokenizer.image_area_id
    asked = {}
    monkeypatch.setattr(text_generation, "generate_text", lambda model, rows, **kwargs: asked.update(kwargs))
    complete_text(model, ["a red"], stop_ids=torch.tensor([area]))
    assert area not in asked["banned_ids"]
