"""Best-of-K sampling judged by the model itself.

To pick among K sampled candidates for one prompt, the model scores each
candidate against the prompt and `best_candidates` keeps the highest score.
No other model takes part, and K = 1 changes nothing. Two scores
(`CANDIDATE_SCORES`):

- ``flow`` (`prompt_flow_gain`): how much reading the prompt first lowers the
  head's flow-matching loss on the candidate's own tokens, compared with the
  image-first (unconditional) reading, at fixed times and noise shared by every
  candidate. A high gain means the image is one the prompt explains: an
  estimate of log p(image | prompt) - log p(image), as a diffusion classifier
  makes it.
- ``caption`` (`prompt_log_likelihood`): training puts the image before its
  caption in a share of the pairs (``ModelConfig.image_first_probability``), so
  the model also learns to write the caption of an image; this score reads each
  candidate followed by the prompt,
  ``<|image_area|>h*w<|begin_of_image|>{image}<|end_of_image|>{prompt}<|endoftext|>``,
  and sums the log-probabilities of the prompt's tokens and the end of text.

Legend: R rows (prompt, candidate pairs), N = h*w tokens per image, D token dim,
S evaluation times.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch
from einops import rearrange, reduce, repeat

from nextstep.config import as_integer

if TYPE_CHECKING:
    from nextstep.model import NextStep
    from nextstep.sequence import SequenceBatch


@torch.no_grad()
def prompt_log_likelihood(model: "NextStep", prompts: list[str], tokens: torch.Tensor, grid_height: int,
                          grid_width: int, batch_size: int = 64) -> torch.Tensor:
    """log p(prompt | image) of each row: prompts (R strings), tokens (R, h*w, D) -> (R,) float32.

    Sums the log-probabilities of the prompt's ids and of ``<|endoftext|>``
    that the LM head gives after ``<|end_of_image|>`` (a vector word's class is
    its embedding row, as in training).

    Raises:
        ValueError: the number of prompts differs from the rows of ``tokens``,
            or ``batch_size`` is below 1.
    """
    _check_rows(prompts, tokens, batch_size)
    device = next(model.parameters()).device
    count = grid_height * grid_width
    scores = []
    for start in range(0, len(prompts), batch_size):
        examples, batch, hidden = _read(model, prompts[start:start + batch_size], tokens[start:start + batch_size],
                                        grid_height, grid_width, image_first=True)
        # The prompt begins one past <|end_of_image|>: input index start + count + 1,
        # predicted from index start + count. Only those positions reach the LM head.
        first = torch.tensor([example.image_start + count for example in examples], device=device)
        index = torch.arange(hidden.shape[1] - 1, device=device)
        prompt_part = batch.text_target_mask[:, 1:] & (index[None] >= first[:, None])  # (B, L-1)
        log_probs = model.lm_head(hidden[:, :-1][prompt_part]).float().log_softmax(dim=-1)  # (M, V)
        targets = model.text_targets(batch.input_ids[:, 1:][prompt_part])
        picked = log_probs.gather(-1, targets[:, None])[:, 0]  # (M,)
        rows = prompt_part.nonzero()[:, 0]
        scores.append(torch.zeros(len(examples), device=device).index_add_(0, rows, picked))
    return torch.cat(scores)


@torch.no_grad()
def prompt_flow_gain(model: "NextStep", prompts: list[str], tokens: torch.Tensor, grid_height: int,
                     grid_width: int, batch_size: int = 32, times: int = 8, seed: int = 0) -> torch.Tensor:
    """Flow-matching loss of each row's tokens without the prompt minus with it: prompts (R
    strings), tokens (R, N, D) -> (R,) float32.

    Both readings of a row see the same ``times`` evaluation times (the midpoints
    of ``times`` equal parts of [0, 1]) and the same noise (drawn once from
    ``seed``, (S, N, D), and shared by every row), so rows compare with common
    random numbers and a row's score does not depend on its batch. The loss of
    a token at time t is ``|velocity(t x1 + (1 - t) x0) - (x1 - x0)|^2`` averaged over
    features; a row's loss averages its tokens and times. An empty prompt
    scores exactly 0 (both readings are the same sequence).

    Raises:
        ValueError: the number of prompts differs from the rows of ``tokens``,
            or ``batch_size`` or ``times`` is below 1.
    """
    _check_rows(prompts, tokens, batch_size)
    if times < 1:
        raise ValueError(f"times must be >= 1, found {times}")
    device = next(model.parameters()).device
    count = grid_height * grid_width
    t = ((torch.arange(times, dtype=torch.float32) + 0.5) / times).to(device)  # (S,)
    noise = torch.randn(times, count, tokens.shape[-1], generator=torch.Generator().manual_seed(seed)).to(device)
    gains = []
    for start in range(0, len(prompts), batch_size):
        chunk = tokens[start:start + batch_size]
        rows = chunk.shape[0]
        # Every (time, row, token) once, time-major: the draws are the same for every row.
        x1 = repeat(chunk.to(device).float(), "b n d -> (s b n) d", s=times)
        x0 = repeat(noise, "s n d -> (s b n) d", b=rows)
        steps = repeat(t, "s -> (s b n)", b=rows, n=count)
        losses = []
        for image_first in (False, True):
            _, batch, hidden = _read(model, prompts[start:start + batch_size], chunk, grid_height, grid_width,
                                     image_first=image_first)
            predicting_image = batch.image_target_mask[:, 1:]  # (B, L-1): the next token is an image token
            conditions = model.image_out_projector(hidden[:, :-1][predicting_image])  # (B*N, C)
            error = model.image_head.flow_error(x1, repeat(conditions, "bn c -> (s bn) c", s=times), steps, x0)
            losses.append(reduce(error, "(s b n) -> b", "mean", s=times, n=count))
        gains.append(losses[1] - losses[0])
    return torch.cat(gains)


def _read(model: "NextStep", prompts: list[str], tokens: torch.Tensor, grid_height: int, grid_width: int, *,
          image_first: bool) -> tuple[list, "SequenceBatch", torch.Tensor]:
    """Teacher-forced forward over (prompt, tokens (B, N, D)) pairs laid out prompt-first or
    image-first: the examples, their batch and the backbone's hidden states (B, L, H)."""
    builder = model.sequences
    device = next(model.parameters()).device
    dtype = next(model.backbone.parameters()).dtype
    examples = [builder.example(prompt, image.float().cpu(), grid_height, grid_width, image_first=image_first)
                for prompt, image in zip(prompts, tokens)]
    batch = builder.collate(examples).to(device, dtype)
    return examples, batch, model.hidden_states(batch)


def _check_rows(prompts: list[str], tokens: torch.Tensor, batch_size: int) -> None:
    if len(prompts) != tokens.shape[0]:
        raise ValueError(f"expected one prompt per row of tokens ({tokens.shape[0]}), found {len(prompts)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, found {batch_size}")


CANDIDATE_SCORES: dict[str, Callable[..., torch.Tensor]] = {
    "flow": prompt_flow_gain,
    "caption": prompt_log_likelihood,
}
"""The scores `generate_tokens` can rank candidates by, by name: each takes (model, prompts,
tokens (R, N, D), grid_height, grid_width) and returns (R,), higher is better. Add a function
under a new name to rank by a score of your own."""


def candidate_score_function(name: str) -> Callable[..., torch.Tensor]:
    """The score called ``name`` in `CANDIDATE_SCORES`.

    Raises:
        ValueError: no score has that name.
    """
    if name not in CANDIDATE_SCORES:
        raise ValueError(f"candidate_score must be one of {sorted(CANDIDATE_SCORES)}, found {name!r}")
    return CANDIDATE_SCORES[name]


def check_candidates(candidates) -> int:
    """``candidates`` (the images drawn for each one kept) as an int >= 1; ``ValueError`` naming it otherwise."""
    count = as_integer(candidates)
    if count is None or count < 1:
        raise ValueError(f"candidates must be an integer >= 1, found {candidates!r}")
    return count


def best_candidates(tokens: torch.Tensor, scores: torch.Tensor, candidates: int) -> torch.Tensor:
    """The best of each image's candidates: tokens (R*K, N, D) and scores (R*K,), rows
    candidate-minor (row r*K + j is candidate j of image r) -> tokens (R, N, D).

    A NaN score ranks below every other (a candidate whose sampling diverged is never kept
    over one that did not); among equal scores the first candidate wins."""
    candidates = check_candidates(candidates)
    if scores.ndim != 1 or tokens.shape[0] != scores.shape[0] or tokens.shape[0] % candidates:
        raise ValueError(f"expected one score for every row and rows divisible by {candidates} candidates, "
                         f"found {tokens.shape[0]} rows and scores of shape {tuple(scores.shape)}")
    ranked = rearrange(scores.float(), "(r k) -> r k", k=candidates)  # (R, K)
    best = ranked.nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf).amax(dim=1, keepdim=True)
    winners = (ranked == best) & ~ranked.isnan()  # every candidate at the best score (NaN never is one)
    # the first winner; a row of NaN scores only keeps its first candidate
    chosen = torch.where(winners.any(dim=1), winners.int().argmax(dim=1), 0)
    grouped = rearrange(tokens, "(r k) n d -> r k n d", k=candidates)
    return grouped[torch.arange(grouped.shape[0], device=grouped.device), chosen]
