"""Preference optimisation (DPO) of a NextStep model from pairs of a preferred and a rejected image.

The NextStep-1 release ends its training with a short DPO stage. The image part
of a NextStep model has no exact likelihood; as in Diffusion-DPO and its
flow-matching variants, the flow-matching error stands in for the negative
log-likelihood. For a caption ``c`` with a preferred image ``w`` and a rejected
image ``l``, each read caption-first with teacher forcing, let ``E(x)`` be the
mean flow error of the image's tokens (`nextstep.heads.base.ImageHead.flow_error`)
under the model being trained and ``E_ref(x)`` under a frozen copy of the model
it started from. The loss is

    -log sigmoid(beta * ((E(l) - E_ref(l)) - (E(w) - E_ref(w))))

so the model learns to lower its error on ``w`` relative to the reference more
than on ``l``. Every token of ``w`` and the same token of ``l`` are read at the
same time ``t`` (logit-normal, as in training) and the same noise, and so are
the two models: the margin then compares the images, not the draws. The two
models also read the same words (the same word-vector substitutions and
context noise, drawn from one generator state).

Legend: B pairs, N image tokens per image, D token dim.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from nextstep.heads.time_sampling import sample_times
from nextstep.model import NextStep
from nextstep.sequence import SequenceBatch
from nextstep.training.config import TrainConfig
from nextstep.training.data.base import ImageTextBatch
from nextstep.training.task import StepResult
from nextstep.training.text_to_image import TextToImageTask


class PreferenceTask(TextToImageTask):
    """Flow-matching DPO on preference batches (`ImageTextBatch.rejected_images`).

    Args:
        model: the model to train; a frozen copy of it, taken now, is the reference.
        beta: scale of the preference logit ``beta * margin``; the margin is a
            difference of mean squared velocity errors per image token, which are
            small (about 0.05 for the shipped model's preferred images), so
            ``beta`` is large: at 500 a margin of 0.002 is a logit of 1.
        sft_weight: weight of the flow-matching loss of the preferred images (at
            the same draws), added to keep the model close to its data (0 by default).
        context_noise: largest scale of the noise on the image tokens read as context.
    """

    @classmethod
    def from_train_config(cls, model: NextStep, config: TrainConfig, **preference: float) -> "PreferenceTask":
        """The task with a run's ``context_noise`` and the preference settings given (``beta``,
        ``sft_weight``); pairs are read one per row, so ``pack_length`` must be unset."""
        if config.pack_length:
            raise ValueError(f"preference training reads one pair per row: pack_length must be None, "
                             f"found {config.pack_length}")
        return cls(model, **preference, context_noise=config.context_noise)

    def __init__(self, model: NextStep, beta: float = 500.0, sft_weight: float = 0.0, context_noise: float = 0.0):
        super().__init__(model, text_dropout=0.0, context_noise=context_noise)
        for name, value in (("beta", beta), ("sft_weight", sft_weight)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, found {value!r}")
        if not beta > 0:
            raise ValueError(f"beta must be > 0, found {beta!r}")
        self.beta = float(beta)
        self.sft_weight = float(sft_weight)
        self.reference = copy.deepcopy(model).requires_grad_(False)

    def pair_sequences(self, batch: ImageTextBatch,
                       generator: torch.Generator | None = None) -> tuple[SequenceBatch, int]:
        """Caption-first sequences of the preferred images (rows 0..B-1) then of the rejected
        ones (rows B..2B-1), and the tokens per image N (a tokenizer that samples its latents draws
        from ``generator``)."""
        if not batch.is_preference:
            raise ValueError("preference training needs batches with rejected images (a preference dataset such as "
                             "shapes_preferences or preference_manifest), found a batch without them")
        chosen, grid_h, grid_w = self.encode(batch.images, None, None, generator)
        rejected, _, _ = self.encode(batch.rejected_images, None, None, generator)
        builder = self.model.sequences
        examples = [builder.example(caption, tokens, grid_h, grid_w)
                    for tokens_of_side in (chosen.float().cpu(), rejected.float().cpu())
                    for caption, tokens in zip(batch.captions, tokens_of_side)]
        return builder.collate(examples).to(self.device), grid_h * grid_w

    def prepare(self, batch: ImageTextBatch, generator: torch.Generator) -> ImageTextBatch:
        return batch  # the pairs are encoded in `loss`, which draws for them

    def target_counts(self, prepared: ImageTextBatch) -> dict[str, float]:
        """Every term is a mean over the pairs."""
        return {"pairs": len(prepared)}

    @property
    def counts_targets(self) -> bool:
        return False  # every micro-batch holds micro_batch_size pairs: both averagings train alike

    def loss(self, module: nn.Module, batch: ImageTextBatch, generator: torch.Generator,
             totals: dict[str, float] | None = None) -> StepResult:
        """The mean over the batch's pairs, or with ``totals`` (the step's number of ``pairs``) the
        batch's share of the mean over the step's pairs; the metrics likewise."""
        sequences, count = self.pair_sequences(batch, generator)
        pairs = len(batch)
        per_pair = pairs if totals is None else totals["pairs"]
        if per_pair < pairs:
            raise ValueError(f"totals['pairs'] must be at least this batch's {pairs} pairs, found {per_pair}")
        # Times drawn as the head's own training draws them (logit-normal unless its config says otherwise).
        head_config = getattr(self.model.image_head, "config", None)
        device = self.device
        times = sample_times(pairs * count, getattr(head_config, "time_sampling", "logit_normal"),
                             mean=getattr(head_config, "time_mean", 0.0), std=getattr(head_config, "time_std", 1.0),
                             shift=getattr(head_config, "time_shift", 1.0), generator=generator, device=device)
        noise = torch.randn(pairs * count, self.model.token_dim, generator=generator, device=device)
        draws = (times.repeat(2), noise.repeat(2, 1))  # the same draws for each token of w and of l
        # ... and the same context noise and word substitutions for the two images of a pair.
        pair_rows = torch.arange(pairs, device=device).repeat(2)
        state = generator.get_state()
        # The global generators too, for what draws from them (dropout of a backbone that has it): the reference
        # replays the policy's draws.
        cuda = [device] if device.type == "cuda" else []
        global_state = torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in cuda]
        policy = module(sequences, generator=generator, context_noise=self.context_noise, flow_draws=draws,
                        draw_rows=pair_rows)
        if next(self.reference.parameters()).device != device:
            self.reference.to(device)
        self.reference.train(self.model.training)
        same = torch.Generator(device=generator.device)
        same.set_state(state)
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):
            torch.set_rng_state(global_state[0])
            for cuda_device, cuda_state in zip(cuda, global_state[1]):
                torch.cuda.set_rng_state(cuda_state, cuda_device)
            reference = self.reference(sequences, generator=same, context_noise=self.context_noise,
                                       flow_draws=draws, draw_rows=pair_rows)
        errors, reference_errors = policy.image_per_row, reference.image_per_row  # (2B,)
        gain = reference_errors - errors  # how much lower the policy's error is than the reference's
        margin = gain[:pairs] - gain[pairs:]  # (B,)
        loss = -F.logsigmoid(self.beta * margin).sum() / per_pair
        metrics = {"preference_loss": float(loss.detach()), "margin": float(margin.detach().sum() / per_pair),
                   "accuracy": float((margin.detach() > 0).float().sum() / per_pair),
                   "chosen_error": float(errors[:pairs].detach().sum() / per_pair),
                   "rejected_error": float(errors[pairs:].detach().sum() / per_pair)}
        if self.sft_weight:
            sft = errors[:pairs].sum() / per_pair  # the preferred images' flow-matching loss, at the same draws
            loss = loss + self.sft_weight * sft
            metrics["sft_loss"] = float(sft.detach())
        # The LM head takes no part in the preference loss; a zero share of the text loss gives every
        # parameter a gradient, as data-parallel training needs.
        loss = loss + 0.0 * policy.text
        return StepResult(loss=loss, metrics=metrics, num_tokens=int(sequences.attention_mask.sum()))
