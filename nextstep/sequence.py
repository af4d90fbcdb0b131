"""NextStep-1's sequence format, and batching of sequences.

A caption-first example is laid out as::

    {caption}<|image_area|>{h}*{w}<|begin_of_image|>{h*w image tokens}<|end_of_image|><|endoftext|>

and an image-first one (text dropout: the image is modelled unconditionally) as::

    <|image_area|>{h}*{w}<|begin_of_image|>{h*w image tokens}<|end_of_image|>{caption}<|endoftext|>

Image positions hold ``<|image_placeholder|>`` in ``input_ids``; their embeddings
come from the image tokens. ``h`` and ``w`` are token-grid sides (pixels / 16).

Legend: B batch, L sequence length, D token dim.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from nextstep.tokenizers.base import TextTokenizer


@dataclass
class Example:
    """One sequence before batching.

    Attributes:
        input_ids: token ids, placeholders at image positions.
        image_tokens: (h*w, D) image tokens in raster order, or None for text only.
        image_start: index in ``input_ids`` of the first image token.
        image_loss: whether the image tokens are targets of the flow-matching loss.
    """

    input_ids: list[int]
    image_tokens: torch.Tensor | None = None
    image_start: int = 0
    image_loss: bool = True


@dataclass
class SequenceBatch:
    """A right-padded batch for training.

    Attributes:
        input_ids: (B, L) int64.
        attention_mask: (B, L) bool, False at padding.
        image_mask: (B, L) bool, True at image-token positions (inputs from ``image_tokens``).
        image_target_mask: (B, L) bool, image positions that are flow-matching targets.
        text_target_mask: (B, L) bool, positions whose token is a cross-entropy target.
        image_tokens: (B, L, D) float, tokens at image positions, zeros elsewhere.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    image_mask: torch.Tensor
    image_target_mask: torch.Tensor
    text_target_mask: torch.Tensor
    image_tokens: torch.Tensor
    extras: dict = field(default_factory=dict)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "SequenceBatch":
        """Move every tensor to ``device``; cast ``image_tokens`` to ``dtype`` if given."""
        return SequenceBatch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            image_mask=self.image_mask.to(device),
            image_target_mask=self.image_target_mask.to(device),
            text_target_mask=self.text_target_mask.to(device),
            image_tokens=self.image_tokens.to(device, dtype or self.image_tokens.dtype),
            extras=self.extras,
        )


_AREA_PATTERN = re.compile(r"^(\d+)\*(\d+)$")


class SequenceBuilder:
    """Builds, parses and batches NextStep sequences for one text tokenizer.

    Args:
        text_tokenizer: supplies ids for text and the special tokens.
        token_dim: D, width of image tokens (for empty placeholders in batches).
    """

    def __init__(self, text_tokenizer: TextTokenizer, token_dim: int):
        self.text_tokenizer = text_tokenizer
        self.token_dim = token_dim

    def image_prefix(self, grid_height: int, grid_width: int) -> list[int]:
        """Ids of ``<|image_area|>{h}*{w}<|begin_of_image|>``."""
        for name, value in (("grid height", grid_height), ("grid width", grid_width)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, found {value!r}")
        tok = self.text_tokenizer
        return [
            tok.image_area_id,
            *tok.encode(f"{grid_height}*{grid_width}"),
            tok.begin_of_image_id,
        ]

    def prompt(self, text: str, grid_height: int, grid_width: int) -> list[int]:
        """Generation prompt: ``{text}<|image_area|>{h}*{w}<|begin_of_image|>``."""
        return self.text_tokenizer.encode(text) + self.image_prefix(grid_height, grid_width)

    def example(
        self,
        caption: str,
        image_tokens: torch.Tensor,
        grid_height: int,
        grid_width: int,
        *,
        image_first: bool = False,
    ) -> Example:
        """A training example for one image-caption pair.

        Args:
            caption: the text.
            image_tokens: (h*w, D) tokens of the image.
            image_first: put the image before the caption (unconditional image modelling).
        """
        count = grid_height * grid_width
        if image_tokens.ndim != 2 or image_tokens.shape != (count, self.token_dim):
            raise ValueError(
                f"image_tokens must have shape ({count}, {self.token_dim}) for a "
                f"{grid_height}x{grid_width} grid, found {tuple(image_tokens.shape)}"
            )
        tok = self.text_tokenizer
        image = [*self.image_prefix(grid_height, grid_width), *[tok.image_placeholder_id] * count,
                 tok.end_of_image_id]
        text = tok.encode(caption)
        if image_first:
            ids = image + text + [tok.eos_id]
            start = len(self.image_prefix(grid_height, grid_width))
        else:
            ids = text + image + [tok.eos_id]
            start = len(text) + len(self.image_prefix(grid_height, grid_width))
        return Example(ids, image_tokens, start)

    def parse(self, input_ids: list[int]) -> tuple[str, int, int]:
        """Inverse of `prompt` / caption-first `example`: ids -> (text, h, w)."""
        tok = self.text_tokenizer
        ids = [int(i) for i in input_ids]
        try:
            area = ids.index(tok.image_area_id)
            begin = ids.index(tok.begin_of_image_id, area)
        except ValueError:
            raise ValueError(
                "sequence has no '<|image_area|>...<|begin_of_image|>' image prefix"
            ) from None
        match = _AREA_PATTERN.match(tok.decode(ids[area + 1 : begin]))
        if match is None:
            raise ValueError(
                f"expected '{{h}}*{{w}}' after <|image_area|>, found {tok.decode(ids[area + 1 : begin])!r}"
            )
        return tok.decode(ids[:area]), int(match.group(1)), int(match.group(2))

    def collate(self, examples: list[Example]) -> SequenceBatch:
        """Right-pad examples into a `SequenceBatch`."""
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        tok = self.text_tokenizer
        length = max(len(e.input_ids) for e in examples)
        batch = len(examples)
        dtype = next((e.image_tokens.dtype for e in examples if e.image_tokens is not None), torch.float32)
        input_ids = torch.full((batch, length), tok.pad_id, dtype=torch.long)
        attention_mask = torch.zeros(batch, length, dtype=torch.bool)
        image_mask = torch.zeros(batch, length, dtype=torch.bool)
        image_target_mask = torch.zeros(batch, length, dtype=torch.bool)
        image_tokens = torch.zeros(batch, length, self.token_dim, dtype=dtype)
        for row, example in enumerate(examples):
            n = len(example.input_ids)
            input_ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
            attention_mask[row, :n] = True
            if example.image_tokens is not None:
                span = slice(example.image_start, example.image_start + example.image_tokens.shape[0])
                image_mask[row, span] = True
                image_target_mask[row, span] = example.image_loss
                image_tokens[row, span] = example.image_tokens.to(dtype)
        text_target_mask = attention_mask & ~image_mask
        text_target_mask[:, 0] = False  # the first token has no prediction
        return SequenceBatch(input_ids, attention_mask, image_mask, image_target_mask,
                             text_target_mask, image_tokens)

    def left_pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-pad id lists: returns input_ids (B, L) int64 and attention_mask (B, L) bool."""
        if not sequences:
            raise ValueError("cannot pad an empty list of sequences")
        length = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), length), self.text_tokenizer.pad_id, dtype=torch.long)
        attention_mask = torch.zeros(len(sequences), length, dtype=torch.bool)
        for row, ids in enumerate(sequences):
            if ids:
                input_ids[row, length - len(ids):] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, length - len(ids):] = True
        return input_ids, attention_mask
