"""Best-of-K sampling: the model's own prompt likelihood picks among candidates."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nextstep import generate_tokens
from nextstep.backbones import positions_from_mask
from nextstep.generation_defaults import GenerationDefaults
from nextstep.reranking import best_candidates, prompt_log_likelihood

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


def scores_favouring(candidate, candidates, calls):
    """A stand-in for `prompt_log_likelihood` that prefers one candidate number and records the prompts."""
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
        monkeypatch.setattr(reranking, "prompt_log_likelihood", scores_favouring(candidate, 3, calls))
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
    real = reranking.prompt_log_likelihood
    monkeypatch.setattr(reranking, "prompt_log_likelihood",
                        lambda model, prompts, *rest, **kw: seen.append(len(prompts)) or real(model, prompts, *rest))
    generate_tokens(model, ["a cat"], seed=0)
    assert seen == [2]
    generate_tokens(model, ["a cat"], seed=0, candidates=1)
    assert seen == [2], "candidates=1 scores nothing"

    model.save_pretrained(tmp_path / "two")
    assert json.loads((tmp_path / "two" / "config.json").read_text())["generation"]["candidates"] == 2
    model.config = model.config.replace(generation=GenerationDefaults())
    model.save_pretrained(tmp_path / "one")
    assert "candidates" not in json.loads((tmp_path / "one" / "config.json").read_text())["generation"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(candidates=0), "candidates must be an integer >= 1, found 0"),
    (dict(candidates=2.0), "candidates must be an integer >= 1, found 2.0"),
])
def test_bad_candidate_counts_are_refused(tiny_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate_tokens(tiny_model, ["a"], **ARGS, **kwargs)
    with pytest.raises(ValueError, match="candidates"):
        GenerationDefaults(candidates=0)


def test_editing_draws_each_image_once(tiny_model):
    image = torch.zeros(1, 3, 32, 32)
    with pytest.raises(ValueError, match="candidates ranks text-to-image samples.*found candidates=2"):
        generate_tokens(tiny_model, ["make it red"], images=image, candidates=2, num_steps=2)


def test_scores_need_one_prompt_per_row(tiny_model):
    with pytest.raises(ValueError, match="one prompt per row of tokens \\(2\\), found 1"):
        prompt_log_likelihood(tiny_model, ["a"], torch.zeros(2, 4, tiny_model.token_dim), 2, 2)
