"""The NextStep model: injected components, projectors, sequence format and losses.

Legend: B batch, L sequence length, H hidden size, D token dim, V vocabulary,
N image tokens that are targets in the batch.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from nextstep.backbones.base import Backbone, positions_from_mask
from nextstep.config import ComponentSpec
from nextstep.heads.base import ImageHead
from nextstep.heads.lm_head import LMHead
from nextstep.heads.time_sampling import check_generator
from nextstep.layers.word_vectors import WordVectorInput
from nextstep.model_config import ModelConfig
from nextstep.samplers.base import Sampler
from nextstep.sequence import SequenceBatch, SequenceBuilder
from nextstep.tokenizers.base import ImageTokenizer, TextTokenizer

if TYPE_CHECKING:
    from PIL import Image


@dataclass
class LossOutput:
    """Losses of one batch (scalars).

    Attributes:
        total: ``text_loss_weight * text + image_loss_weight * image``.
        text: mean cross-entropy over text targets (0 if there are none); with
            ``denominators``, their summed cross-entropy divided by the text denominator.
        image: mean flow-matching loss over image targets (0 if there are none); with
            ``denominators``, their summed loss divided by the image denominator.
        num_text_tokens / num_image_tokens: how many targets each term covers.
        image_per_row: (B,) float32, the mean flow-matching loss of each row's image
            targets (0 for a row without any; a packed row mixes its sequences).
    """

    total: torch.Tensor
    text: torch.Tensor
    image: torch.Tensor
    num_text_tokens: int
    num_image_tokens: int
    image_per_row: torch.Tensor | None = None


def _first_rows(draw_rows: torch.Tensor) -> torch.Tensor:
    """(U,) the first row of each index 0..U-1 of ``draw_rows`` (B,)."""
    count = int(draw_rows.max()) + 1
    rows = torch.arange(draw_rows.shape[0], device=draw_rows.device)
    firsts = torch.full((count,), draw_rows.shape[0], device=draw_rows.device).scatter_reduce(
        0, draw_rows, rows, reduce="amin")
    if int(firsts.max()) >= draw_rows.shape[0]:
        raise ValueError(f"draw_rows must use every index from 0 to {count - 1}, found {draw_rows.tolist()}")
    return firsts


class NextStep(nn.Module):
    """Autoregressive text-to-image model over continuous image tokens.

    Args:
        image_tokenizer: images <-> tokens (D = ``token_dim``).
        text_tokenizer: text <-> ids with NextStep's special tokens (may be None
            for a model used only for inspection or training on prepared batches).
        backbone: causal transformer of width H.
        image_head: velocity model; its ``token_dim`` must equal the tokenizer's
            and its ``condition_dim`` the backbone's hidden size.
        sampler: default solver for `generate`.
        config: model-level settings. ``current_config()`` (used by
            ``save_pretrained``) reads the component specs from the live components.
        lm_head: optional; by default a new (or tied) `LMHead`.

    The image tokenizer's parameters are frozen (``requires_grad=False``):
    NextStep trains on latents of a fixed tokenizer.
    """

    def __init__(
        self,
        image_tokenizer: ImageTokenizer,
        text_tokenizer: TextTokenizer | None,
        backbone: Backbone,
        image_head: ImageHead,
        sampler: Sampler,
        config: ModelConfig,
        lm_head: LMHead | None = None,
    ):
        super().__init__()
        if image_head.token_dim != image_tokenizer.token_dim:
            raise ValueError(
                f"image head token_dim {image_head.token_dim} differs from the image tokenizer's "
                f"token_dim {image_tokenizer.token_dim}; build the head with "
                f"token_dim={image_tokenizer.token_dim}"
            )
        if image_head.condition_dim != backbone.hidden_size:
            raise ValueError(
                f"image head condition_dim {image_head.condition_dim} differs from the backbone's "
                f"hidden_size {backbone.hidden_size}"
            )
        if text_tokenizer is not None and text_tokenizer.vocab_size > backbone.vocab_size:
            raise ValueError(
                f"text tokenizer has {text_tokenizer.vocab_size} ids but the backbone's embedding "
                f"table has only {backbone.vocab_size} rows"
            )
        vectors = config.word_vectors
        if text_tokenizer is not None and text_tokenizer.input_vocab_size != max(vectors.count,
                                                                               text_tokenizer.vocab_size):
            raise ValueError(
                f"text tokenizer produces {text_tokenizer.input_vocab_size} ids ({text_tokenizer.vocab_size} "
                f"with an embedding row) but the model has word vectors for {vectors.count}; the ids "
                "beyond the embedding table need one word vector each (config word_vectors.count)"
            )
        defaults = config.generation
        try:
            image_tokenizer.grid_size(defaults.height, defaults.width)
        except ValueError as error:
            raise ValueError(f"config.generation (the default output size, {defaults.height}x{defaults.width}): "
                             f"{error}") from None
        self.config = config
        # The tokenizer is trained on its own; the transformer sees its frozen latents.
        image_tokenizer.requires_grad_(False)
        self.image_tokenizer = image_tokenizer
        self.text_tokenizer = text_tokenizer
        self.backbone = backbone
        self.image_head = image_head
        self.sampler = sampler
        #: Parts of the file the model was loaded from stored in another dtype than they load in, which
        #: `save_pretrained` stores so again (see `nextstep.serialization.stored_dtypes`); {} for a new model.
        self.stored_dtypes: dict[str, torch.dtype] = {}
        hidden = backbone.hidden_size
        self.image_in_projector = nn.Linear(image_tokenizer.token_dim, hidden)
        self.image_out_projector = nn.Linear(hidden, hidden)
        self.word_vectors = (WordVectorInput(vectors, backbone.vocab_size, hidden) if vectors.count else None)
        if lm_head is None:
            tied = backbone.input_embeddings() if config.tie_word_embeddings else None
            lm_head = LMHead(hidden, backbone.vocab_size, tied_embedding=tied)
        self.lm_head = lm_head

    # ------------------------------------------------------------------ sizes
    @property
    def token_dim(self) -> int:
        return self.image_tokenizer.token_dim

    @property
    def sequences(self) -> SequenceBuilder:
        """The sequence builder for this model's text tokenizer."""
        return SequenceBuilder(self.require_text_tokenizer(), self.token_dim)

    def require_text_tokenizer(self) -> TextTokenizer:
        if self.text_tokenizer is None:
            raise ValueError("this model was built without a text tokenizer; pass one to NextStep")
        return self.text_tokenizer

    # ----------------------------------------------------------------- training
    def embed_text(self, input_ids: torch.Tensor, *, substitute: bool = False,
                   generator: torch.Generator | None = None) -> torch.Tensor:
        """Text ids (B, L) -> embeddings (B, L, H): the backbone's table, plus the projected word
        vectors when the model has them (``substitute``: with the training substitutions of
        `nextstep.layers.word_vectors.WordVectorInput`, drawn from ``generator``)."""
        if self.word_vectors is None:
            return self.backbone.embed(input_ids)
        table_ids, added = self.word_vectors(input_ids, substitute, generator)
        text = self.backbone.embed(table_ids)
        return text + added.to(text.dtype)

    def text_targets(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Text ids -> the LM head's classes: a vector word's class is its table row."""
        return input_ids if self.word_vectors is None else self.word_vectors.table_ids(input_ids)

    def embed(self, input_ids: torch.Tensor, image_mask: torch.Tensor, image_tokens: torch.Tensor, *,
              substitute: bool = False, generator: torch.Generator | None = None,
              draw_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Input embeddings (B, L, H): text embeddings (see `embed_text`), image projections at
        image positions. Rows with one ``draw_rows`` index (B,) read their text with the same
        substitutions, those of the first of them; they must hold the same ids."""
        if image_tokens.shape[-1] != self.image_head.token_dim:
            raise ValueError(f"image tokens must be {self.image_head.token_dim} wide (the image head's token_dim), "
                             f"found shape {tuple(image_tokens.shape)}")
        if draw_rows is None:
            text = self.embed_text(input_ids, substitute=substitute, generator=generator)
        else:
            if draw_rows.shape != input_ids.shape[:1]:
                raise ValueError(f"draw_rows must have shape ({input_ids.shape[0]},), one index per row, found "
                                 f"{tuple(draw_rows.shape)}")
            firsts = _first_rows(draw_rows)
            if not torch.equal(input_ids, input_ids[firsts][draw_rows]):
                raise ValueError("rows that share their random draws (draw_rows) must hold the same text ids")
            text = self.embed_text(input_ids[firsts], substitute=substitute, generator=generator)[draw_rows]
        image = self.image_in_projector(image_tokens.to(text.dtype))
        return torch.where(image_mask[..., None], image, text)

    def hidden_states(self, batch: SequenceBatch, context: torch.Tensor | None = None, *, substitute: bool = False,
                      generator: torch.Generator | None = None, draw_rows: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """The backbone's hidden states (B, L, H) of a batch read whole (teacher forcing).

        Args:
            batch: the sequences (one per row, or packed).
            context: (B, L, D) image tokens to read in place of ``batch.image_tokens``
                (the training loss passes them with context noise).
            substitute: apply the word-vector training substitutions (see `embed_text`).
            generator: the source of those substitutions.
            draw_rows: (B,) rows with one index share their substitutions (see `embed`).
        """
        context = batch.image_tokens if context is None else context
        embeds = self.embed(batch.input_ids, batch.image_mask, context, substitute=substitute, generator=generator,
                            draw_rows=draw_rows)
        mask = batch.backbone_mask
        return self.backbone(embeds, positions_from_mask(mask), mask)

    def forward(self, batch: SequenceBatch, generator: torch.Generator | None = None,
                context_noise: float = 0.0, flow_draws: tuple[torch.Tensor, torch.Tensor] | None = None,
                draw_rows: torch.Tensor | None = None,
                denominators: torch.Tensor | tuple[float, float] | None = None) -> LossOutput:
        """Teacher-forced losses of a batch.

        The hidden state at position i (after ``image_out_projector``) conditions
        the head that predicts the image token at i + 1; the LM head at i predicts
        the text token at i + 1.

        Args:
            batch: the sequences, one per row or packed (`SequenceBuilder.pack`: attention
                and positions then stay within each sequence).
            generator: the source of the head's (t, noise) draws and of the context noise.
            context_noise: with ``s > 0``, each sequence's image tokens are read as
                context with Gaussian noise of scale ``U(0, s)`` added (one scale per
                sequence); the head's targets stay clean.
            flow_draws: the times (N,) and noise (N, D) of the N image targets of the
                batch, in row-major order, instead of the head's own draws: every
                target's flow error is taken once at its given (t, x0)
                (`nextstep.heads.base.ImageHead.flow_error`). Preference training reads
                two models, or two images of one prompt, at the same draws.
            draw_rows: (B,) indices from 0: rows with one index read their context with the same
                noise and their text with the same word substitutions (the draws of the first
                of them), as the two images of a preference pair are; None draws for each row.
                Not with packed sequences.
            denominators: (2,) the (text, image) counts to divide the summed text and image
                losses by, instead of this batch's own numbers of targets. With the numbers of
                targets of a whole optimiser step, the losses of its micro-batches (and
                processes) add up to the loss of the step's examples taken as one batch. Each
                must be at least this batch's own count. (A tensor keeps a compiled forward from
                recompiling for each step's counts.)
        """
        if not isinstance(batch, SequenceBatch):
            raise TypeError(f"forward takes a SequenceBatch (from prepare_batch, or SequenceBuilder.collate), found "
                            f"{type(batch).__name__}")
        check_generator(generator)
        if isinstance(context_noise, bool) or not isinstance(context_noise, (int, float)) \
                or not 0 <= context_noise < math.inf:
            raise ValueError(f"context_noise must be a finite number >= 0 (0: clean context), found {context_noise!r}")
        num_text, num_image = batch.target_counts()
        if denominators is not None:
            denominators = torch.as_tensor(denominators, dtype=torch.float32, device=batch.input_ids.device)
            if denominators.shape != (2,) or not all(
                    c <= d < math.inf for d, c in zip(denominators.tolist(), (num_text, num_image))):
                raise ValueError(f"denominators must be (text, image) counts at least this batch's numbers of "
                                 f"targets {(num_text, num_image)}, found {denominators.tolist()}")
        context = batch.image_tokens
        if draw_rows is not None and batch.document_ids is not None:
            raise ValueError("draw_rows shares draws between whole rows; packed sequences draw per sequence")
        if context_noise > 0:
            rows = context.shape[0] if draw_rows is None else int(draw_rows.max()) + 1
            if batch.document_ids is None:
                scale = torch.rand(rows, 1, 1, generator=generator, device=context.device) * context_noise
            else:  # one scale per packed sequence
                documents = int(batch.document_ids.max()) + 1
                scales = torch.rand(rows, documents, generator=generator, device=context.device) * context_noise
                scale = scales.gather(1, batch.document_ids)[..., None]  # (B, L, 1)
            noise = torch.randn((rows, *context.shape[1:]), generator=generator, device=context.device)
            if draw_rows is not None:
                scale, noise = scale[draw_rows], noise[draw_rows]
            context = context + (scale * noise).to(context.dtype)
        hidden = self.hidden_states(batch, context, substitute=self.training, generator=generator,
                                    draw_rows=draw_rows)  # (B, L, H)
        previous = hidden[:, :-1]

        text_mask = batch.text_target_mask[:, 1:]
        if num_text:
            logits = self.lm_head(previous[text_mask]).float()  # (M, V)
            targets = self.text_targets(batch.input_ids[:, 1:][text_mask])
            if denominators is None:
                text_loss = F.cross_entropy(logits, targets)
            else:
                text_loss = F.cross_entropy(logits, targets, reduction="sum") / denominators[0]
        else:
            text_loss = hidden.new_zeros((), dtype=torch.float32)

        image_mask = batch.image_target_mask[:, 1:]
        per_row = hidden.new_zeros(hidden.shape[0], dtype=torch.float32)
        if num_image:
            conditions = self.image_out_projector(previous[image_mask])  # (N, H)
            targets = batch.image_tokens[:, 1:][image_mask]  # (N, D)
            if flow_draws is None:
                per_token = self.image_head.loss(targets, conditions, generator=generator)  # (N,)
            else:
                times, noise = flow_draws
                if times.shape != (num_image,) or noise.shape != targets.shape:
                    raise ValueError(f"flow_draws must be times ({num_image},) and noise {tuple(targets.shape)} "
                                     f"for this batch's image targets, found {tuple(times.shape)} and "
                                     f"{tuple(noise.shape)}")
                per_token = self.image_head.flow_error(targets, conditions, times, noise)
            image_loss = per_token.mean() if denominators is None else per_token.sum() / denominators[1]
            rows = image_mask.nonzero()[:, 0]
            counts = image_mask.sum(-1).clamp(min=1).float()
            per_row = per_row.index_add(0, rows, per_token.float()) / counts
        else:
            image_loss = hidden.new_zeros((), dtype=torch.float32)

        total = self.config.text_loss_weight * text_loss + self.config.image_loss_weight * image_loss
        if not (num_text or num_image):
            total = total + 0.0 * hidden.sum()
        return LossOutput(total, text_loss, image_loss, num_text, num_image, per_row)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, int, int]:
        """Images (B, 3, H, W) in [-1, 1] -> tokens (B, h*w, D) and the grid (h, w).

        Args:
            images: (B, 3, H, W) in [-1, 1].
            generator: when the image tokenizer samples its latents
                (`nextstep.tokenizers.base.ImageTokenizer.samples_latents`), its draws are seeded
                from this generator (one draw from it) instead of coming from the global ones.
        """
        tokenizer = self.image_tokenizer
        tokenizer.grid_size(int(images.shape[-2]), int(images.shape[-1]))
        seed = None  # drawn only for a sampled posterior
        if generator is not None and tokenizer.samples_latents:
            seed = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))
        # In the tokenizer's own precision whatever autocast the caller runs under (training's bf16).
        latents = tokenizer.encode_in_own_precision(images, seed)
        tokens = self.image_tokenizer.patchify(latents)
        return tokens, latents.shape[-2] // self.image_tokenizer.patch_size, \
            latents.shape[-1] // self.image_tokenizer.patch_size

    def prepare_batch(
        self,
        images: torch.Tensor,
        captions: list[str],
        *,
        generator: torch.Generator | None = None,
        image_first: list[bool] | None = None,
    ) -> SequenceBatch:
        """Encode images and build a training batch.

        Args:
            images: (B, 3, H, W) in [-1, 1].
            captions: B strings.
            generator: draws the image-first (text dropout) decisions with
                probability ``config.image_first_probability``.
            image_first: explicit per-example ordering (B booleans); overrides the draw.

        Raises:
            ValueError: as many captions (or ``image_first`` entries) as images, found otherwise; images
                that are not a (B, 3, H, W) tensor.
        """
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            found = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a (B, 3, H, W) tensor in [-1, 1], found {found} "
                             "(nextstep.images.from_pil converts PIL images of one size)")
        if isinstance(captions, str) or not all(isinstance(caption, str) for caption in captions):
            raise ValueError(f"captions must be a list of strings, one per image, found {captions!r:.80}")
        if len(captions) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {len(captions)} captions")
        if image_first is not None and len(image_first) != len(captions):
            raise ValueError(f"image_first must hold one ordering per caption ({len(captions)}), "
                             f"found {len(image_first)}")
        tokens, grid_h, grid_w = self.encode_images(images, generator)
        if image_first is None:
            device = generator.device if generator is not None else "cpu"
            draws = torch.rand(len(captions), generator=generator, device=device)
            image_first = (draws < self.config.image_first_probability).tolist()
        builder = self.sequences
        examples = [
            builder.example(caption, tokens[i].cpu(), grid_h, grid_w, image_first=first)
            for i, (caption, first) in enumerate(zip(captions, image_first))
        ]
        return builder.collate(examples).to(images.device)

    # --------------------------------------------------------------- generation
    def generate(self, prompts: list[str] | str, **kwargs) -> list["Image.Image"]:
        """Text-to-image, or editing with ``images=``; see `nextstep.generation.generate_tokens`."""
        from nextstep.generation import generate

        return generate(self, prompts, **kwargs)

    def caption(self, images, **kwargs: Any) -> list[str]:
        """Captions of images (PIL or (B, 3, H, W) in [-1, 1]) written by the LM head, greedily by
        default; see `nextstep.text_generation.caption_images`."""
        from nextstep.text_generation import caption_images

        return caption_images(self, images, **kwargs).texts

    def complete(self, prompts: list[str] | str, **kwargs: Any) -> list[str]:
        """Continuations of text prompts written by the LM head; see
        `nextstep.text_generation.complete_text`."""
        from nextstep.text_generation import complete_text

        return complete_text(self, prompts, **kwargs).texts

    # ------------------------------------------------------------ persistence
    def current_config(self) -> ModelConfig:
        """The model config with every component spec taken from the live components."""
        specs = {}
        for kind, component in (
            ("image_tokenizer", self.image_tokenizer),
            ("text_tokenizer", self.text_tokenizer),
            ("backbone", self.backbone),
            ("image_head", self.image_head),
            ("sampler", self.sampler),
        ):
            if component is None:
                specs[kind] = getattr(self.config, kind)
                continue
            specs[kind] = ComponentSpec.of(kind, component)
        return self.config.replace(**specs)

    def save_pretrained(self, directory: str | os.PathLike, *,
                        storage_dtypes: dict[str, torch.dtype] | None = None,
                        extra_files: dict[str, str] | None = None) -> None:
        """Write ``config.json``, ``model.safetensors`` and tokenizer files atomically.

        ``storage_dtypes`` stores some parts in another floating dtype, e.g.
        ``{"image_tokenizer.decoder": torch.float16}`` (None: as the file the model was loaded from
        stored them, `stored_dtypes`); ``extra_files`` (name -> text) are written in the same
        replacement (see `nextstep.serialization.save_pretrained`).
        """
        from nextstep.serialization import save_pretrained

        save_pretrained(self, Path(directory), storage_dtypes=storage_dtypes, extra_files=extra_files)

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, *, device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> "NextStep":
        """Load a directory written by `save_pretrained`, or a published NextStep-1 release directory.

        The layout is detected from ``config.json`` (see `nextstep.interop.layout`).
        """
        from nextstep.interop.layout import load_model_directory

        return load_model_directory(Path(directory), device=device, dtype=dtype)

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per component (shared tensors counted once, under the first owner)."""
        seen: set[int] = set()
        counts: dict[str, int] = {}
        for name, module in (
            ("image_tokenizer", self.image_tokenizer),
            ("backbone", self.backbone),
            ("lm_head", self.lm_head),
            ("projectors", nn.ModuleList([self.image_in_projector, self.image_out_projector])),
            ("image_head", self.image_head),
            *((("word_vectors", self.word_vectors),) if self.word_vectors is not None else ()),
        ):
            total = 0
            for parameter in module.parameters():
                if id(parameter) not in seen:
                    seen.add(id(parameter))
                    total += parameter.numel()
            counts[name] = total
        counts["total"] = sum(counts.values())
        return counts
