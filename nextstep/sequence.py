"""NextStep-1's sequence format, and batching of sequences.

A caption-first example is laid out as::

    {caption}<|image_area|>{h}*{w}<|begin_of_image|>{h*w image tokens}<|end_of_image|><|endoftext|>

and an image-first one (text dropout: the image is modelled unconditionally) as::

    <|image_area|>{h}*{w}<|begin_of_image|>{h*w image tokens}<|end_of_image|>{caption}<|endoftext|>

An editing example puts the source image first, then the instruction, then the
edited image; only the edited image is a flow-matching target::

    {source image block}{instruction}{target image block}<|endoftext|>

where an image block is ``<|image_area|>{h}*{w}<|begin_of_image|>{tokens}<|end_of_image|>``.

Image positions hold ``<|image_placeholder|>`` in ``input_ids``; their embeddings
come from the image tokens. ``h`` and ``w`` are token-grid sides (pixels / 16).

Legend: B batch, L sequence length, D token dim.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from nextstep.config import as_integer, described
from nextstep.tokenizers.base import TextTokenizer


@dataclass
class ImageSpan:
    """One image inside a sequence.

    Attributes:
        start: index in ``input_ids`` of the image's first token.
        tokens: (h*w, D) image tokens in raster order.
        loss: whether these tokens are targets of the flow-matching loss.
    """

    start: int
    tokens: torch.Tensor
    loss: bool = False


@dataclass
class Example:
    """One sequence before batching.

    Attributes:
        input_ids: token ids, placeholders at image positions.
        image_tokens: (h*w, D) image tokens in raster order, or None for text only.
        image_start: index in ``input_ids`` of the first image token.
        image_loss: whether the image tokens are targets of the flow-matching loss.
        extra_images: further images of the sequence (an editing source image),
            each with its own position and loss flag.
    """

    input_ids: list[int]
    image_tokens: torch.Tensor | None = None
    image_start: int = 0
    image_loss: bool = True
    extra_images: list[ImageSpan] = field(default_factory=list)

    def image_spans(self) -> list[ImageSpan]:
        """Every image of the sequence: the main one (if any) and the extra ones."""
        spans = list(self.extra_images)
        if self.image_tokens is not None:
            spans.append(ImageSpan(self.image_start, self.image_tokens, self.image_loss))
        return spans


@dataclass
class SequenceBatch:
    """A right-padded batch for training: one sequence per row, or several packed into each
    (`SequenceBuilder.pack`).

    Attributes:
        input_ids: (B, L) int64.
        attention_mask: (B, L) bool, False at padding.
        image_mask: (B, L) bool, True at image-token positions (inputs from ``image_tokens``).
        image_target_mask: (B, L) bool, image positions that are flow-matching targets.
        text_target_mask: (B, L) bool, positions whose token is a cross-entropy target.
        image_tokens: (B, L, D) float, tokens at image positions, zeros elsewhere.
        extras: anything a task wants to carry along.
        document_ids: (B, L) int64 for a packed batch: which sequence of its row each
            position belongs to, from 1 (0 at padding); None when each row is one sequence.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    image_mask: torch.Tensor
    image_target_mask: torch.Tensor
    text_target_mask: torch.Tensor
    image_tokens: torch.Tensor
    extras: dict = field(default_factory=dict)
    document_ids: torch.Tensor | None = None

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
            document_ids=None if self.document_ids is None else self.document_ids.to(device),
        )

    @property
    def backbone_mask(self) -> torch.Tensor:
        """What the backbone reads as ``attention_mask``: the document ids of a packed
        batch, else the padding mask."""
        return self.attention_mask if self.document_ids is None else self.document_ids

    def target_counts(self) -> tuple[int, int]:
        """(text, image): how many positions are cross-entropy and flow-matching targets (a
        target is predicted from the position before it, so the first position never is)."""
        return int(self.text_target_mask[:, 1:].sum()), int(self.image_target_mask[:, 1:].sum())


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
        sides = []
        for name, value in (("grid height", grid_height), ("grid width", grid_width)):
            side = as_integer(value)
            if side is None or side < 1:
                raise ValueError(f"{name} must be a positive integer, found {described(value)}")
            sides.append(side)
        tok = self.text_tokenizer
        return [
            tok.image_area_id,
            *tok.encode(f"{sides[0]}*{sides[1]}"),
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
        max_length: int | None = None,
    ) -> Example:
        """A training example for one image-caption pair.

        Args:
            caption: the text.
            image_tokens: (h*w, D) tokens of the image.
            image_first: put the image before the caption (unconditional image modelling).
            max_length: at most this many ids in all: a longer caption loses its last tokens (packed
                training's rows hold examples of up to the packing length); None keeps the whole caption.

        Raises:
            ValueError: image tokens of another shape, or a ``max_length`` the image alone exceeds.
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
        if max_length is not None:
            room = max_length - len(image) - 1
            if room < 0:
                raise ValueError(f"a {grid_height}x{grid_width} image takes {len(image) + 1} ids with the end of "
                                 f"text, more than max_length {max_length}")
            text = text[:room]
        if image_first:
            ids = image + text + [tok.eos_id]
            start = len(self.image_prefix(grid_height, grid_width))
        else:
            ids = text + image + [tok.eos_id]
            start = len(text) + len(self.image_prefix(grid_height, grid_width))
        return Example(ids, image_tokens, start)

    def image_block(self, grid_height: int, grid_width: int) -> list[int]:
        """Ids of a whole image: prefix, ``h*w`` placeholders, ``<|end_of_image|>``."""
        tok = self.text_tokenizer
        return [*self.image_prefix(grid_height, grid_width),
                *[tok.image_placeholder_id] * (grid_height * grid_width), tok.end_of_image_id]

    def editing_prompt(
        self,
        text: str,
        source_grid: tuple[int, int],
        grid_height: int,
        grid_width: int,
    ) -> tuple[list[int], int]:
        """Editing generation prompt: ``{source image block}{text}<|image_area|>{h}*{w}<|begin_of_image|>``.

        Args:
            text: the instruction (or the negative prompt, for a guidance branch).
            source_grid: (h, w) token grid of the source image.
            grid_height: token-grid height of the image to generate.
            grid_width: token-grid width of the image to generate.

        Returns:
            the ids (placeholders at the source image) and the index of the source
            image's first token.
        """
        source_height, source_width = source_grid
        block = self.image_block(source_height, source_width)
        start = len(self.image_prefix(source_height, source_width))
        return block + self.text_tokenizer.encode(text) + self.image_prefix(grid_height, grid_width), start

    def editing_example(
        self,
        instruction: str,
        source_tokens: torch.Tensor,
        source_grid: tuple[int, int],
        target_tokens: torch.Tensor,
        target_grid: tuple[int, int],
    ) -> Example:
        """A training example for one edit: source image, instruction, edited image.

        Only the edited image is a flow-matching target (``image_tokens``); the
        source image is an input (``extra_images``, no loss).

        Args:
            instruction: the editing text.
            source_tokens: (h_s*w_s, D) tokens of the source image.
            source_grid: (h_s, w_s).
            target_tokens: (h*w, D) tokens of the edited image.
            target_grid: (h, w).
        """
        for name, tokens, (height, width) in (("source_tokens", source_tokens, source_grid),
                                              ("target_tokens", target_tokens, target_grid)):
            count = height * width
            if tokens.ndim != 2 or tokens.shape != (count, self.token_dim):
                raise ValueError(
                    f"{name} must have shape ({count}, {self.token_dim}) for a {height}x{width} "
                    f"grid, found {tuple(tokens.shape)}"
                )
        ids, source_start = self.editing_prompt(instruction, source_grid, *target_grid)
        target_start = len(ids)
        tok = self.text_tokenizer
        ids = ids + [tok.image_placeholder_id] * target_tokens.shape[0] + [tok.end_of_image_id, tok.eos_id]
        return Example(ids, target_tokens, target_start, image_loss=True,
                       extra_images=[ImageSpan(source_start, source_tokens, loss=False)])

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
        """Right-pad examples into a `SequenceBatch`, one example per row."""
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        return self._lay_out([[example] for example in examples], packed=False)

    def pack(self, examples: list[Example], max_length: int) -> SequenceBatch:
        """Pack examples into rows of at most ``max_length`` tokens (a packed `SequenceBatch`).

        Examples are placed longest first into the first row with room for them
        (first-fit decreasing), then each row keeps them in their input order.
        Rows are as long as the fullest one. ``document_ids`` numbers the examples
        of each row from 1 (0 at padding), so that the backbone attends within each
        example only and positions restart at each; the first token of every
        example is no text target. The model's text loss equals that of `collate`
        on the same examples; the image loss has the same targets and conditions,
        its random (t, noise) draws falling on them in another order.

        Raises:
            ValueError: no examples, ``max_length`` below 1, or an example longer than it.
        """
        if not examples:
            raise ValueError("cannot pack an empty list of examples")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be an integer >= 1, found {max_length!r}")
        lengths = [len(example.input_ids) for example in examples]
        for index, length in enumerate(lengths):
            if length > max_length:
                raise ValueError(f"example {index} has {length} tokens, more than the packing length {max_length}")
        rows: list[list[int]] = []
        room: list[int] = []
        for index in sorted(range(len(examples)), key=lambda i: -lengths[i]):
            row = next((r for r, free in enumerate(room) if free >= lengths[index]), None)
            if row is None:
                rows.append([])
                room.append(max_length)
                row = len(rows) - 1
            rows[row].append(index)
            room[row] -= lengths[index]
        return self._lay_out([[examples[i] for i in sorted(row)] for row in rows], packed=True)

    def _lay_out(self, rows: list[list[Example]], packed: bool) -> SequenceBatch:
        """Examples placed one after another in each row, right-padded to the longest row."""
        tok = self.text_tokenizer
        length = max(sum(len(e.input_ids) for e in row) for row in rows)
        batch = len(rows)
        dtype = next((span.tokens.dtype for row in rows for e in row for span in e.image_spans()), torch.float32)
        input_ids = torch.full((batch, length), tok.pad_id, dtype=torch.long)
        document_ids = torch.zeros(batch, length, dtype=torch.long)
        image_mask = torch.zeros(batch, length, dtype=torch.bool)
        image_target_mask = torch.zeros(batch, length, dtype=torch.bool)
        image_tokens = torch.zeros(batch, length, self.token_dim, dtype=dtype)
        starts = torch.zeros(batch, length, dtype=torch.bool)
        for row, examples in enumerate(rows):
            offset = 0
            for number, example in enumerate(examples, start=1):
                n = len(example.input_ids)
                input_ids[row, offset:offset + n] = torch.tensor(example.input_ids, dtype=torch.long)
                document_ids[row, offset:offset + n] = number
                starts[row, offset] = True
                for image in example.image_spans():
                    self._check_image(example.input_ids, image)
                    span = slice(offset + image.start, offset + image.start + image.tokens.shape[0])
                    image_mask[row, span] = True
                    image_target_mask[row, span] = image.loss
                    image_tokens[row, span] = image.tokens.to(dtype)
                offset += n
        attention_mask = document_ids > 0
        text_target_mask = attention_mask & ~image_mask & ~starts  # a sequence's first token has no prediction
        return SequenceBatch(input_ids, attention_mask, image_mask, image_target_mask, text_target_mask,
                             image_tokens, document_ids=document_ids if packed else None)

    def _check_image(self, ids: list[int], image: ImageSpan) -> None:
        """Raise ``ValueError`` unless ``image`` of an example with ``ids`` is (n, D) tokens over n placeholder
        ids that follow at least one other id (the position that predicts the image's first token)."""
        tokens, start, placeholder = image.tokens, image.start, self.text_tokenizer.image_placeholder_id
        if tokens.ndim != 2 or tokens.shape[1] != self.token_dim:
            raise ValueError(f"an example's image tokens must have shape (n, {self.token_dim}), "
                             f"found {tuple(tokens.shape)}")
        end = start + tokens.shape[0]
        if not 1 <= start <= end <= len(ids):
            raise ValueError(f"an example's image span {start}..{end} must lie within its {len(ids)} ids and "
                             "start after the first (which predicts the image's first token)")
        found = [token for token in ids[start:end] if token != placeholder]
        if found:
            raise ValueError(f"an example's ids at its image span {start}..{end} must be <|image_placeholder|> "
                             f"({placeholder}), found {found[:5]}")

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
