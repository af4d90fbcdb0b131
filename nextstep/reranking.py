"""Best-of-K sampling judged by the model itself.

Training puts the image before its caption in a share of the pairs
(``ModelConfig.image_first_probability``), so a NextStep model also learns to
write the caption of an image. To pick among K sampled candidates for one
prompt, `prompt_log_likelihood` reads each candidate followed by the prompt,
``<|image_area|>h*w<|begin_of_image|>{image}<|end_of_image|>{prompt}<|endoftext|>``,
and sums the log-probabilities of the prompt's tokens and the end of text;
`best_candidates` keeps the candidate under which the prompt is most likely.
No other model takes part, and K = 1 changes nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from einops import rearrange

from nextstep.backbones.base import positions_from_mask

if TYPE_CHECKING:
    from nextstep.model import NextStep


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
    if len(prompts) != tokens.shape[0]:
        raise ValueError(f"expected one prompt per row of tokens ({tokens.shape[0]}), found {len(prompts)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, found {batch_size}")
    builder = model.sequences
    device = next(model.parameters()).device
    dtype = next(model.backbone.parameters()).dtype
    count = grid_height * grid_width
    scores = []
    for start in range(0, len(prompts), batch_size):
        examples = [builder.example(prompt, image.float().cpu(), grid_height, grid_width, image_first=True)
                    for prompt, image in zip(prompts[start:start + batch_size], tokens[start:start + batch_size])]
        batch = builder.collate(examples).to(device, dtype)
        embeds = model.embed(batch.input_ids, batch.image_mask, batch.image_tokens)
        hidden = model.backbone(embeds, positions_from_mask(batch.attention_mask), batch.attention_mask)
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


def best_candidates(tokens: torch.Tensor, scores: torch.Tensor, candidates: int) -> torch.Tensor:
    """The best of each image's candidates: tokens (R*K, N, D) and scores (R*K,), rows
    candidate-minor (row r*K + j is candidate j of image r) -> tokens (R, N, D)."""
    if tokens.shape[0] != scores.shape[0] or tokens.shape[0] % candidates:
        raise ValueError(f"expected scores for every row and rows divisible by {candidates} candidates, "
                         f"found {tokens.shape[0]} rows and {scores.shape[0]} scores")
    chosen = rearrange(scores, "(r k) -> r k", k=candidates).argmax(dim=1)
    grouped = rearrange(tokens, "(r k) n d -> r k n d", k=candidates)
    return grouped[torch.arange(grouped.shape[0], device=grouped.device), chosen]
