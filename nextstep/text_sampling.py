"""Choosing the next text token from the LM head's logits: greedy, temperature, top-k, top-p.

Each row draws with one uniform number in [0, 1) that the caller supplies, by
the inverse of the kept distribution's cumulative sum, so the choice of a row
depends on its logits and its number alone (batched choices equal the rows
chosen one at a time, and a seeded generator per row makes them reproducible).

The filters apply in this order: banned classes, temperature, top-k, top-p.

Legend: R rows, V classes.
"""

from __future__ import annotations

import math

import torch


def check_text_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ``ValueError`` naming the setting that is out of range."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be a finite number >= 0 (0 chooses greedily), found {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 or None, found {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be a number in (0, 1] or None, found {top_p!r}")
    if temperature == 0 and (top_k is not None or top_p is not None):
        raise ValueError(f"top_k and top_p narrow random draws, which need temperature > 0; found temperature 0 "
                         f"(greedy choice) with top_k={top_k!r}, top_p={top_p!r}")


def kept_log_weights(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                     top_p: float | None = None, banned: torch.Tensor | None = None) -> torch.Tensor:
    """The unnormalised log-probabilities a draw uses: logits (R, V) -> (R, V) float32, -inf where excluded.

    Args:
        logits: the LM head's output.
        temperature: divides the logits; must be > 0 here (greedy choice needs no weights).
        top_k: keep the k largest logits of each row (exactly k classes).
        top_p: keep the most probable classes whose probabilities, largest first, sum to
            at least ``top_p`` (the smallest such set; the most probable class always stays).
        banned: (V,) bool, classes never chosen.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (R, V), found {tuple(logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"kept_log_weights needs temperature > 0, found {temperature!r}")
    check_text_sampling(temperature, top_k, top_p)
    weights = logits.float()
    if banned is not None:
        if banned.shape != weights.shape[-1:]:
            raise ValueError(f"banned must have shape ({weights.shape[-1]},), found {tuple(banned.shape)}")
        weights = weights.masked_fill(banned.to(weights.device), float("-inf"))
    # Measured from each row's largest allowed logit, so that no temperature turns logits into inf / inf.
    top = weights.amax(dim=-1, keepdim=True)
    weights = (weights - torch.where(torch.isfinite(top), top, 0.0)) / temperature
    if top_k is not None and top_k < weights.shape[-1]:
        kept = torch.zeros_like(weights, dtype=torch.bool)
        kept.scatter_(-1, weights.topk(top_k, dim=-1, sorted=False).indices, True)
        weights = weights.masked_fill(~kept, float("-inf"))
    if top_p is not None and top_p < 1:
        ordered, order = weights.sort(dim=-1, descending=True, stable=True)
        probabilities = ordered.softmax(dim=-1)
        mass_before = probabilities.cumsum(dim=-1) - probabilities  # (R, V), largest first
        dropped = torch.zeros_like(weights, dtype=torch.bool).scatter_(-1, order, mass_before >= top_p)
        weights = weights.masked_fill(dropped, float("-inf"))
    return weights


def choose_tokens(logits: torch.Tensor, uniforms: torch.Tensor, *, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None,
                  banned: torch.Tensor | None = None) -> torch.Tensor:
    """One class per row: logits (R, V), uniforms (R,) in [0, 1) -> (R,) int64.

    ``temperature`` 0 takes each row's largest allowed logit (the uniforms are
    not used); otherwise row ``r`` takes the first class, in vocabulary order,
    whose cumulative kept probability exceeds ``uniforms[r]`` (see
    `kept_log_weights` for the filters).

    Raises:
        ValueError: a setting is out of range, the shapes disagree, or every class
            of a row is banned.
    """
    check_text_sampling(temperature, top_k, top_p)
    if uniforms.shape != logits.shape[:1]:
        raise ValueError(f"expected one uniform per row, shape ({logits.shape[0]},), found {tuple(uniforms.shape)}")
    if banned is not None and bool(banned.all()):
        raise ValueError("every class is banned; nothing can be chosen")
    if logits.ndim == 2 and logits.numel() and bool(torch.isnan(logits).any()):
        rows = torch.isnan(logits).any(dim=-1).nonzero().flatten().tolist()
        raise FloatingPointError(f"the LM head's logits hold NaN (rows {rows[:5]}): no token can be chosen from "
                                 "them; the model's weights or inputs are not finite")
    if temperature == 0:
        weights = logits.float()
        if banned is not None:
            weights = weights.masked_fill(banned.to(weights.device), float("-inf"))
        return weights.argmax(dim=-1)
    weights = kept_log_weights(logits, temperature=temperature, top_k=top_k, top_p=top_p, banned=banned)
    cumulative = weights.double().softmax(dim=-1).cumsum(dim=-1)  # (R, V)
    targets = uniforms.to(cumulative) * cumulative[:, -1]
    chosen = torch.searchsorted(cumulative, targets[:, None], right=True)[:, 0]
    # Rounding can leave the target at the total; then the last kept class is meant.
    last_kept = weights.shape[-1] - 1 - torch.isfinite(weights).flip(-1).long().argmax(dim=-1)
    return torch.minimum(chosen, last_kept)
