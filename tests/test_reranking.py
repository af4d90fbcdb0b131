"""Best-of-K sampling: the model's own score of each candidate against its prompt picks among them."""

import copy
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nextstep import generate_tokens
from nextstep.backbones import positions_from_mask
from nextstep.generation_defaults import GenerationDefaults
from nextstep.reranking import CANDIDATE_SCORES, best_candidates, prompt_flow_gain, prompt_log_likelihood

ARGS = dict(height=32, width=32, num_steps=3, cfg=3.0)


def log_likelihood_one_token_at_a_time(model, prompt, tokens, grid_h, grid_w):
    """log p(prompt ids, <|endoftext|> | image): one forward per predicted token, each on the
    sequence cut just before it."""
    builder = model.sequences
    example = builder.example(prompt, tokens, grid_h, grid_w, image_first=True)
    ids = torch.tensor(example.input_ids)
    first = example.image_start + grid_h * grid_w + 1  # the prompt's first id
    total = 0.0
    for target in range(first, len(ids)):
        prefix = ids[None, :target]
        mask = torch.ones_like(prefix, dtype=torch.bool)
        image_mask = torch.zeros_like(mask)
        image_mask[0, example.image_start:example.image_start + grid_h * grid_w] = True
        image_tokens = torch.zeros(1, target, model.token_dim)
        image_tokens[image_mask] = tokens
        hidden = model.backbone(model.embed(prefix, image_mask, image_tokens), positions_from_mask(mask), mask)
        log_probs = model.lm_head(hidden[:, -1]).float().log_softmax(-1)[0]
        total += float(log_probs[model.text_targets(ids[target])])
    return total


def test_the_score_is_the_prompts_log_likelihood_after_the_image(trained_like_model):
    model = trained_like_model.eval()
    tokens = torch.randn(3, 4, model.token_dim)
    prompts = ["a red circle", "b", "a much longer prompt than the others"]
    with torch.no_grad():
        scores = prompt_log_likelihood(model, prompts, tokens, 2, 2, batch_size=2)
        expected = [log_likelihood_one_token_at_a_time(model, p, t, 2, 2) for p, t in zip(prompts, tokens)]
    torch.testing.assert_close(scores, torch.tensor(expected), atol=1e-4, rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(images=st.integers(1, 4), candidates=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_the_best_candidate_of_each_image_is_kept(images, candidates, seed):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(images * candidates, 3, 2, generator=generator)
    scores = torch.randn(images * candidates, generator=generator)
    chosen = best_candidates(tokens, scores, candidates)
    assert chosen.shape == (images, 3, 2)
    for image in range(images):
        group = slice(image * candidates, (image + 1) * candidates)
        assert torch.equal(chosen[image], tokens[group][scores[group].argmax()])


def test_a_nan_score_never_wins_and_bad_counts_are_named():
    tokens = torch.arange(6.0).view(6, 1, 1)
    scores = torch.tensor([0.0, float("nan"), 1.0, float("nan"), float("nan"), float("nan")])
    chosen = best_candidates(tokens, scores, 3)
    assert chosen.flatten().tolist() == [2.0, 3.0]  # an image whose candidates all diverged keeps its first
    for candidates in (0, -1, True):
        with pytest.raises(ValueError, match=rf"candidates must be an integer >= 1, found {candidates!r}"):
            best_candidates(tokens, scores, candidates)
    with pytest.raises(ValueError, match=r"one score for every row .*found 6 rows and scores of shape \(6, 1\)"):
        best_candidates(tokens, scores[:, None], 3)


def flow_loss_one_token_at_a_time(model, prompt, tokens, grid_h, grid_w, image_first, times, noise):
    """The head's flow loss on each image token, its condition read from a forward over the
    sequence cut just before that token, averaged over tokens and the given times and noise."""
    builder = model.sequences
    example = builder.example(prompt, tokens, grid_h, grid_w, image_first=image_first)
    ids = torch.tensor(example.input_ids)
    count = grid_h * grid_w
    total = 0.0
    for index in range(count):
        cut = example.image_start + index  # the token's position; its condition comes from the one before
        prefix = ids[None, :cut]
        mask = torch.ones_like(prefix, dtype=torch.bool)
        image_mask = torch.zeros_like(mask)
        image_mask[0, example.image_start:cut] = True
        image_tokens = torch.zeros(1, cut, model.token_dim)
        image_tokens[image_mask] = tokens[:index]
        hidden = model.backbone(model.embed(prefix, image_mask, image_tokens), positions_from_mask(mask), mask)
        condition = model.image_out_projector(hidden[:, -1])  # (1, C)
        for t, x0 in zip(times, noise[:, index]):
            x1 = tokens[index]
            velocity = model.image_head.velocity((t * x1 + (1 - t) * x0)[None], t[None], condition)[0]
            total += float((velocity - (x1 - x0)).pow(2).mean())
    return total / (count * len(times))


def test_the_flow_gain_is_the_loss_the_prompt_saves_on_the_image(trained_like_model):
    model = trained_like_model.eval()
    tokens = torch.randn(2, 4, model.token_dim, generator=torch.Generator().manual_seed(3))
    prompts = ["a red circle", "a much longer prompt than the other"]
    times = (torch.arange(3) + 0.5) / 3
    noise = torch.randn(3, 4, model.token_dim, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        gains = prompt_flow_gain(model, prompts, tokens, 2, 2, times=3, seed=7)
        expected = [flow_loss_one_token_at_a_time(model, p, x, 2, 2, True, times, noise)
                    - flow_loss_one_token_at_a_time(model, p, x, 2, 2, False, times, noise)
                    for p, x in zip(prompts, tokens)]
    torch.testing.assert_close(gains, torch.tensor(expected), atol=1e-5, rtol=1e-4)
    assert gains.abs().min() > 0


def test_the_flow_gain_of_an_empty_prompt_is_zero_and_rows_do_not_depend_on_their_batch(trained_like_model):
    model = trained_like_model.eval()
    tokens = torch.randn(5, 4, model.token_dim, generator=torch.Generator().manual_seed(0))
    prompts = ["a", "", "a red circle", "b c", "a"]
    with torch.no_grad():
        together = prompt_flow_gain(model, prompts, tokens, 2, 2, batch_size=5)
        apart = torch.cat([prompt_flow_gain(model, [p], x[None], 2, 2) for p, x in zip(prompts, tokens)])
    torch.testing.assert_close(together, apart, atol=1e-6, rtol=1e-5)
    assert together[1] == 0
    with pytest.raises(ValueError, match="times must be >= 1, found 0"):
        prompt_flow_gain(model, prompts, tokens, 2, 2, times=0)


def scores_favouring(candidate, candidates, calls):
    """A stand-in for a candidate score that prefers one candidate number and records the prompts."""
    def fake(model, prompts, tokens, grid_h, grid_w, batch_size=64):
        calls.append(list(prompts))
        return torch.tensor([float(row % candidates == candidate) for row in range(len(prompts))])

    return fake


def test_candidate_zero_is_the_image_one_draw_gives(trained_like_model, monkeypatch):
    import nextstep.reranking as reranking

    model = trained_like_model.eval()
    plain, _, _ = generate_tokens(model, ["a cat", "b"], seed=5, num_images_per_prompt=2, **ARGS)
    for candidate in (0, 2):
        calls = []
        monkeypatch.setitem(reranking.CANDIDATE_SCORES, "flow", scores_favouring(candidate, 3, calls))
        picked, _, _ = generate_tokens(model, ["a cat", "b"], seed=5, num_images_per_prompt=2, candidates=3,
                                       **ARGS)
        assert calls == [["a cat"] * 6 + ["b"] * 6]
        if candidate == 0:
            torch.testing.assert_close(picked, plain, atol=1e-5, rtol=1e-5)
        else:
            assert not torch.allclose(picked, plain)


def test_candidates_batch_like_one_prompt_at_a_time(trained_like_model):
    model = trained_like_model.eval()
    batched, _, _ = generate_tokens(model, ["a", "a much longer prompt"], seed=3, candidates=3, **ARGS)
    serial = [generate_tokens(model, [prompt], seed=3 + index, candidates=3, **ARGS)[0]
              for index, prompt in enumerate(["a", "a much longer prompt"])]
    torch.testing.assert_close(batched, torch.cat(serial), atol=1e-4, rtol=1e-4)


def test_the_models_default_number_of_candidates_applies(trained_like_model, monkeypatch, tmp_path):
    import nextstep.reranking as reranking

    model = trained_like_model.eval()
    model.config = model.config.replace(generation=GenerationDefaults(num_steps=2, height=32, width=32,
                                                                      candidates=2))
    seen = []
    for name, real in list(CANDIDATE_SCORES.items()):
        def recording(model, prompts, *rest, name=name, real=real):
            seen.append((name, len(prompts)))
            return real(model, prompts, *rest)

        monkeypatch.setitem(reranking.CANDIDATE_SCORES, name, recording)
    generate_tokens(model, ["a cat"], seed=0)
    assert seen == [("flow", 2)]
    generate_tokens(model, ["a cat"], seed=0, candidates=1)
    assert seen == [("flow", 2)], "candidates=1 scores nothing"
    generate_tokens(model, ["a cat"], seed=0, candidate_score="caption")
    assert seen == [("flow", 2), ("caption", 2)]

    model.save_pretrained(tmp_path / "two")
    assert json.loads((tmp_path / "two" / "config.json").read_text())["generation"]["candidates"] == 2
    assert "candidate_score" not in json.loads((tmp_path / "two" / "config.json").read_text())["generation"]
    model.config = model.config.replace(generation=GenerationDefaults(candidate_score="caption"))
    model.save_pretrained(tmp_path / "one")
    saved = json.loads((tmp_path / "one" / "config.json").read_text())["generation"]
    assert "candidates" not in saved and saved["candidate_score"] == "caption"


@pytest.mark.parametrize("kwargs, match", [
    (dict(candidates=0), "candidates must be an integer >= 1, found 0"),
    (dict(candidates=2.0), "candidates must be an integer >= 1, found 2.0"),
])
def test_bad_candidate_counts_are_refused(tiny_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate_tokens(tiny_model, ["a"], **ARGS, **kwargs)
    with pytest.raises(ValueError, match="candidates"):
        GenerationDefaults(candidates=0)


def test_an_unknown_candidate_score_is_named_with_the_known_ones(tiny_model):
    with pytest.raises(ValueError, match="candidate_score must be one of \\['caption', 'flow'\\], found 'clip'"):
        generate_tokens(tiny_model, ["a"], candidates=2, candidate_score="clip", **ARGS)
    with pytest.raises(ValueError, match="candidate_score.*'clip'"):
        GenerationDefaults(candidate_score="clip")


def test_editing_draws_each_image_once(tiny_model):
    image = torch.zeros(1, 3, 32, 32)
    with pytest.raises(ValueError, match="candidates ranks text-to-image samples.*found candidates=2"):
        generate_tokens(tiny_model, ["make it red"], images=image, candidates=2, num_steps=2)
    # A model whose own default ranks candidates still edits, drawing each image once.
    model = copy.deepcopy(tiny_model)
    model.config = model.config.replace(generation=model.config.generation.replace(candidates=2))
    edited = generate_tokens(model, ["make it red"], images=image, num_steps=2, seed=0)[0]
    once = generate_tokens(model, ["make it red"], images=image, num_steps=2, seed=0, candidates=1)[0]
    assert torch.equal(edited, once)


def test_scores_need_one_prompt_per_row(tiny_model):
    with pytest.raises(ValueError, match="one prompt per row of tokens \\(2\\), found 1"):
        prompt_log_likelihood(tiny_model, ["a"], torch.zeros(2, 4, tiny_model.token_dim), 2, 2)


def test_a_nan_score_ranks_below_negative_scores():
    tokens = torch.arange(6.0).view(6, 1, 1)
    scores = torch.tensor([float("nan"), -3.0, -1.0, float("nan"), -2.0, -5.0])
    assert best_candidates(tokens, scores, 3).flatten().tolist() == [2.0, 4.0]


def test_a_nan_score_ranks_below_a_score_of_minus_infinity():
    tokens = torch.arange(6.0).view(6, 1, 1)
    scores = torch.tensor([float("nan"), -float("inf"), float("nan"), float("nan"), -float("inf"), -float("inf")])
    assert best_candidates(tokens, scores, 2).flatten().tolist() == [1.0, 2.0, 4.0]
