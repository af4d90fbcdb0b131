"""`TextToImageTask`: NextStep's training loss on image-caption (and editing) batches.

Legend: B batch, N image tokens per image, D token dim.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from nextstep.config import require
from nextstep.model import NextStep
from nextstep.sequence import SequenceBatch
from nextstep.training.config import TrainConfig
from nextstep.training.data.base import ImageTextBatch
from nextstep.training.task import StepResult, TrainingTask


class TextToImageTask(TrainingTask):
    """Teacher-forced NextStep loss: ``text_weight * CE + image_weight * flow matching``.

    Images are encoded by the model's frozen tokenizer, or taken from a latent
    cache when the batch carries tokens. Each pair is ordered image-first with
    probability ``text_dropout`` (the image is then modelled without its
    caption, which classifier-free guidance needs). Editing batches (with a
    source image) put the flow-matching loss on the target image only.

    Args:
        model: the NextStep model.
        text_dropout: chance of the image-first order; None keeps
            ``model.config.image_first_probability``.
        context_noise: largest scale of the noise on the image tokens read as
            context (see `TrainConfig.context_noise`).
        pack_length: pack each micro-batch's sequences into rows of at most this
            many tokens (`SequenceBuilder.pack`); None gives one sequence per row.
    """

    samples_from_prompts = True

    def __init__(self, model: NextStep, text_dropout: float | None = None, context_noise: float = 0.0,
                 pack_length: int | None = None):
        super().__init__(model)
        if pack_length is not None and (isinstance(pack_length, bool) or not isinstance(pack_length, int)
                                        or pack_length < 1):
            raise ValueError(f"pack_length must be None or an integer >= 1, found {pack_length!r}")
        self.pack_length = pack_length
        require(context_noise >= 0, "context_noise", context_noise, ">= 0")
        self.context_noise = context_noise
        require(text_dropout is None or 0 <= text_dropout <= 1, "text_dropout", text_dropout, "in [0, 1]")
        self.text_dropout = model.config.image_first_probability if text_dropout is None else text_dropout

    @classmethod
    def from_train_config(cls, model: NextStep, config: TrainConfig) -> "TextToImageTask":
        """The task with a run's ``text_dropout``, ``context_noise`` and ``pack_length``."""
        return cls(model, text_dropout=config.text_dropout, context_noise=config.context_noise,
                   pack_length=config.pack_length)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, images: torch.Tensor | None, tokens: torch.Tensor | None,
               grid: tuple[int, int] | None, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, int, int]:
        """Tokens (B, N, D) and grid (h, w): cached ones, or the images encoded now (a tokenizer that
        samples its latents draws from ``generator``)."""
        if tokens is not None:
            if grid is None:
                raise ValueError("a batch with cached tokens must say their grid (h, w)")
            return tokens, grid[0], grid[1]
        if images is None:
            raise ValueError("the batch holds neither images nor cached tokens")
        encoded, height, width = self.model.encode_images(images.to(self.device), generator)
        return encoded, height, width

    def sequences(self, batch: ImageTextBatch, generator: torch.Generator) -> SequenceBatch:
        """The `SequenceBatch` of a data batch (text dropout drawn from ``generator``)."""
        if batch.is_preference:
            raise ValueError("this batch holds preference pairs (rejected images), which the NextStep loss would "
                             "ignore; train them with PreferenceTask (a recipe's 'preference' block)")
        builder = self.model.sequences
        tokens, grid_h, grid_w = self.encode(batch.images, batch.tokens, batch.grid, generator)
        tokens = tokens.float().cpu()
        if batch.is_editing:
            source, source_h, source_w = self.encode(batch.source_images, batch.source_tokens, batch.source_grid,
                                                     generator)
            source = source.float().cpu()
            examples = [
                builder.editing_example(caption, source[i], (source_h, source_w), tokens[i], (grid_h, grid_w))
                for i, caption in enumerate(batch.captions)
            ]
            return self._batch(builder, examples)
        draws = torch.rand(len(batch), generator=generator, device=generator.device)
        image_first = (draws < self.text_dropout).tolist()
        examples = [
            builder.example(caption, tokens[i], grid_h, grid_w, image_first=first, max_length=self.pack_length)
            for i, (caption, first) in enumerate(zip(batch.captions, image_first))
        ]
        return self._batch(builder, examples)

    def _batch(self, builder, examples) -> SequenceBatch:
        batch = builder.collate(examples) if self.pack_length is None else builder.pack(examples, self.pack_length)
        return batch.to(self.device)

    def prepare(self, batch: ImageTextBatch, generator: torch.Generator) -> SequenceBatch:
        return self.sequences(batch, generator)

    def target_counts(self, prepared: SequenceBatch) -> dict[str, float]:
        """The numbers of text (cross-entropy) and image (flow-matching) targets."""
        text, image = prepared.target_counts()
        return {"text": text, "image": image}

    def loss(self, module: nn.Module, batch: ImageTextBatch | SequenceBatch, generator: torch.Generator,
             totals: dict[str, float] | None = None) -> StepResult:
        """The loss of a data batch or of its prepared sequences: with ``totals`` (the step's
        numbers of ``text`` and ``image`` targets) the micro-batch's share of the step's loss,
        else its own mean."""
        sequences = batch if isinstance(batch, SequenceBatch) else self.sequences(batch, generator)
        denominators = None
        if totals is not None:
            denominators = torch.tensor([totals["text"], totals["image"]], dtype=torch.float32,
                                        device=sequences.input_ids.device)
        output = module(sequences, generator=generator, context_noise=self.context_noise,
                        denominators=denominators)
        return StepResult(
            loss=output.total,
            metrics={"text_loss": float(output.text.detach()), "image_loss": float(output.image.detach())},
            num_tokens=int(sequences.attention_mask.sum()),
        )

    def shard_units(self) -> list[nn.Module]:
        return self.model.backbone.decoder_layers()

    def enable_gradient_checkpointing(self) -> None:
        self.model.backbone.set_gradient_checkpointing(True)

    def sample_images(self, prompts: tuple[str, ...] = (), height: int = 64, width: int = 64,
                      cfg: float = 3.0, num_steps: int = 20, seed: int = 0, **_: Any) -> list[Image.Image]:
        if not prompts:
            return []
        return self.model.generate(list(prompts), height=height, width=width, cfg=cfg, num_steps=num_steps,
                                   seed=seed)

    def check_sample_settings(self, height: int, width: int) -> None:
        try:
            self.model.image_tokenizer.grid_size(height, width)
        except ValueError as error:
            raise ValueError(f"train.sample_height and train.sample_width: {error}") from error

    def check_checkpoint_files(self) -> None:
        self.model.current_config()  # names a component that is not registered, before the first step

    def write_checkpoint_files(self, directory: Path) -> None:
        # config.json and tokenizer files beside model.safetensors: the checkpoint
        # directory loads with NextStep.from_pretrained.
        from nextstep.serialization import write_config_and_tokenizer

        write_config_and_tokenizer(self.model, directory)
