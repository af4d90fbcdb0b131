"""Text from the LM head: continuing a prompt, and captioning images.

The LM head is trained on every text position of the sequences, so a model
writes text as well as images. Training puts the image before its caption in a
share of the pairs (``ModelConfig.image_first_probability``, the text dropout
that guidance needs), which teaches the model to caption: `caption_images`
reads ``<|image_area|>{h}*{w}<|begin_of_image|>{image}<|end_of_image|>`` and
writes until ``<|endoftext|>``. `complete_text` continues plain text and stops
before an image would begin (``<|image_area|>``).

Decoding uses the backbone's static cache: one prefill of the left-padded
prompts, then one cached step per new token for the whole batch. Row ``r``
draws its tokens with its own generator seeded ``seed + r``
(`nextstep.text_sampling.choose_tokens`), so a batch writes what its rows write
one at a time. ``temperature=0`` (the default) chooses greedily.

Legend: R rows, P prompt length, H hidden size, V classes of the LM head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch

from nextstep.generation import PromptRow, check_prompts, check_seed, encode_each, prefill
from nextstep.images import as_image_list
from nextstep.text_sampling import check_text_sampling, choose_tokens
from nextstep.tokenizers.base import token_id_list
from nextstep.tokenizers.special_tokens import NEXTSTEP_SPECIAL_TOKENS

if TYPE_CHECKING:
    from PIL import Image

    from nextstep.model import NextStep

@dataclass
class GeneratedText:
    """What `generate_text` wrote for each row.

    Attributes:
        texts: the decoded new text, without the stop token.
        ids: the new ids, ending with the stop id when one was written.
        log_probs: (R,) float32, the sum of the model's log-probabilities of ``ids``
            (its own distribution: temperature 1, nothing filtered or banned).
        stopped: whether each row ended with a stop id (else it reached ``max_new_tokens``).
    """

    texts: list[str]
    ids: list[list[int]]
    log_probs: torch.Tensor
    stopped: list[bool]


def _check_row(number: int, row, tokenizer, token_dim: int) -> None:
    """Raise ``ValueError`` unless ``row`` is ``(ids, [(start, tokens (n, token_dim)), ...])`` with each
    span's tokens replacing ``<|image_placeholder|>`` ids of the row."""
    if not isinstance(row, (tuple, list)) or len(row) != 2:
        raise ValueError(f"prompt row {number} must be a pair (ids, spans), found {row!r:.80}")
    ids, spans = row
    _check_ids("prompt ids", ids, tokenizer.input_vocab_size)
    if not ids:
        raise ValueError("every prompt row needs at least one id, found an empty one")
    for span in spans:
        if not isinstance(span, (tuple, list)) or len(span) != 2:
            raise ValueError(f"prompt row {number}: a span must be a pair (start, tokens), found {span!r:.80}")
        start, tokens = span
        if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.shape[1] != token_dim:
            found = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"prompt row {number}: span tokens must have shape (n, {token_dim}), found {found}")
        end = start + tokens.shape[0] if isinstance(start, int) and not isinstance(start, bool) else -1
        if end < 0 or start < 0 or end > len(ids) or any(
                value != tokenizer.image_placeholder_id for value in list(ids)[start:end]):
            raise ValueError(f"prompt row {number}: a span of {tokens.shape[0]} tokens from {start!r} must cover "
                             f"<|image_placeholder|> ids of the row's {len(ids)}, found "
                             f"{list(ids)[start:end] if end >= 0 else start!r:.80}")


def _check_ids(name: str, ids, vocabulary: int) -> list[int]:
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise ValueError(f"{name} must be a list of ids in [0, {vocabulary}), found {type(ids).__name__} {ids!r:.40}")
    ids = list(ids)
    for value in ids:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocabulary:
            raise ValueError(f"{name} must be ids in [0, {vocabulary}), found {value!r}")
    return ids


def generate_text(
    model: "NextStep",
    rows: Sequence[PromptRow],
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    stop_ids: Sequence[int] | None = None,
    banned_ids: Sequence[int] = (),
) -> GeneratedText:
    """Continue each prompt row with text from the LM head.

    Args:
        model: the model.
        rows: prompts as ``(ids, [(start, tokens (n, D)), ...])``: token ids with
            ``<|image_placeholder|>`` at image positions, and the image tokens that
            replace the placeholders from index ``start`` on.
        max_new_tokens: most ids written per row.
        temperature: 0 chooses the most probable token; otherwise the logits are
            divided by it before drawing.
        top_k: draw among the k most probable tokens only.
        top_p: draw among the most probable tokens whose probabilities sum to ``top_p``.
        seed: row ``r`` draws from a generator seeded ``seed + r``.
        stop_ids: a row ends once it writes one of these (default ``<|endoftext|>``; empty: rows
            write ``max_new_tokens`` ids).
        banned_ids: ids never written, besides ``[PAD]``, ``<|image_placeholder|>``
            and the LM head's classes the text tokenizer cannot decode.

    Returns:
        a `GeneratedText`.

    Raises:
        ValueError: no rows, a setting out of range, or an id outside the vocabulary.
    """
    tokenizer = model.require_text_tokenizer()
    rows = list(rows)
    if not rows:
        raise ValueError("generate_text needs at least one prompt row, found none")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, found {max_new_tokens!r}")
    check_text_sampling(temperature, top_k, top_p)
    check_seed(seed)
    classes = model.lm_head.vocab_size
    decodable = min(classes, tokenizer.vocab_size)
    stop = _check_ids("stop_ids", [tokenizer.eos_id] if stop_ids is None else stop_ids, decodable)
    banned_list = _check_ids("banned_ids", banned_ids, classes)
    for number, row in enumerate(rows):
        _check_row(number, row, tokenizer, model.token_dim)

    backbone = model.backbone
    device = next(model.parameters()).device
    dtype = next(backbone.parameters()).dtype
    banned = torch.zeros(classes, dtype=torch.bool, device=device)
    banned[[tokenizer.pad_id, tokenizer.image_placeholder_id, *banned_list]] = True
    banned[decodable:] = True
    if stop and bool(banned[stop].all()):
        raise ValueError(f"every stop id {stop} is banned; a row could never stop")
    stop_tensor = torch.tensor(stop, dtype=torch.long, device=device)
    generators = [torch.Generator().manual_seed(seed + row) for row in range(len(rows))]

    with torch.inference_mode():
        hidden, cache, next_positions, step_mask = prefill(model, rows, max_new_tokens, device, dtype)  # (R, H)

        written = torch.full((len(rows), max_new_tokens), tokenizer.pad_id, dtype=torch.long, device=device)
        lengths = torch.zeros(len(rows), dtype=torch.long, device=device)
        log_probs = torch.zeros(len(rows), device=device)
        active = torch.ones(len(rows), dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            logits = model.lm_head(hidden).float()  # (R, V)
            # Greedy choice needs no draws; otherwise one uniform per row from the row's own generator.
            uniforms = (torch.zeros(len(rows), device=device) if temperature == 0 else
                        torch.cat([torch.rand(1, generator=generator) for generator in generators]).to(device))
            chosen = choose_tokens(logits, uniforms, temperature=temperature, top_k=top_k, top_p=top_p,
                                   banned=banned)  # (R,)
            picked = logits.log_softmax(dim=-1).gather(-1, chosen[:, None])[:, 0]
            log_probs += torch.where(active, picked, torch.zeros_like(picked))
            written[:, step] = chosen
            lengths += active.long()
            active &= ~torch.isin(chosen, stop_tensor)
            if step == max_new_tokens - 1 or not bool(active.any()):
                break
            hidden = backbone(model.embed_text(chosen[:, None]), next_positions, step_mask, cache)[:, 0]
            next_positions = next_positions + 1
    log_probs = log_probs.clone()  # an ordinary tensor, usable outside inference mode

    ids = [row[:length] for row, length in zip(written.tolist(), lengths.tolist())]
    stopped = [bool(row) and row[-1] in stop for row in ids]
    texts = [tokenizer.decode(row[:-1] if ended else row) for row, ended in zip(ids, stopped)]
    return GeneratedText(texts, ids, log_probs, stopped)


def _stopping_before_images(tokenizer, kwargs: dict) -> dict:
    """``kwargs`` with ``stop_ids`` at end-of-text and ``<|image_area|>``, and ``banned_ids`` the other NextStep
    control tokens (an image's markers, the thinking and prompt-refinement ones), which are no text, unless
    given (None counts as not)."""
    if kwargs.get("stop_ids") is None:
        kwargs = {**kwargs, "stop_ids": [tokenizer.eos_id, tokenizer.image_area_id]}
    if kwargs.get("banned_ids") is None:
        try:  # checked by generate_text, which names what is wrong with them
            stops = set(token_id_list(kwargs["stop_ids"]))
        except TypeError:
            stops = set()
        kwargs = {**kwargs, "banned_ids": [token for token in (tokenizer.special_token_id(name)
                                                               for name in NEXTSTEP_SPECIAL_TOKENS)
                                           if token not in stops]}
    return kwargs


def complete_text(model: "NextStep", prompts: str | Sequence[str], **kwargs: Any) -> GeneratedText:
    """Continue text prompts; a row stops at ``<|endoftext|>`` or where an image would begin
    (``<|image_area|>``), and writes none of NextStep's other control tokens unless ``banned_ids`` is
    given. Keyword arguments are those of `generate_text`."""
    tokenizer = model.require_text_tokenizer()
    rows = []
    for prompt in check_prompts(prompts):
        ids = tokenizer.encode(prompt)
        if not ids:
            raise ValueError("complete_text needs non-empty prompts, found ''")
        rows.append((ids, []))
    return generate_text(model, rows, **_stopping_before_images(tokenizer, kwargs))


def caption_images(model: "NextStep",
                   images: "Image.Image | torch.Tensor | Sequence[Image.Image | torch.Tensor]",
                   **kwargs: Any) -> GeneratedText:
    """Caption images: each is encoded by the image tokenizer and read as
    ``<|image_area|>{h}*{w}<|begin_of_image|>{tokens}<|end_of_image|>``, then the model writes
    until ``<|endoftext|>``, or until it starts another image (``<|image_area|>``), which text
    generation cannot fill; NextStep's other control tokens are never written unless ``banned_ids``
    is given.

    Args:
        model: the model.
        images: PIL images or (B, 3, H, W) tensors in [-1, 1]; sizes may differ
            (each must suit the tokenizer: sides multiples of its pixels per token).
        **kwargs: those of `generate_text` (greedy by default).
    """
    builder = model.sequences
    rows = []
    images = as_image_list(images)
    check_seed(kwargs.get("seed", 0))  # before the images are encoded with it (generate_text checks it again)
    seeds = [kwargs.get("seed", 0) + index for index in range(len(images))]  # row r's seed, as for its text
    tokenizer = model.require_text_tokenizer()
    kwargs = _stopping_before_images(tokenizer, kwargs)
    for tokens, grid_h, grid_w in encode_each(model, images, seeds):
        rows.append((builder.image_block(grid_h, grid_w), [(len(builder.image_prefix(grid_h, grid_w)), tokens)]))
    return generate_text(model, rows, **kwargs)
