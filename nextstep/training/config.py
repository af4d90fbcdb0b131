"""`TrainConfig`: the numbers of a training run (optimiser, schedule, batch, logging, checkpoints).

The defaults are the released NextStep-1 hyperparameters (AdamW betas 0.9 / 0.95,
eps 1e-8, weight decay 0.1, learning rate 1e-4, 5000 warmup steps then cosine,
gradient clipping at 1.0); recipes override what they need.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nextstep.compile import CompileConfig
from nextstep.config import Config, require
from nextstep.samplers.guidance import check_scale

PRECISIONS = ("auto", "fp32", "bf16")
PARALLELISMS = ("ddp", "fsdp")
LOSS_AVERAGINGS = ("step", "micro_batch")


@dataclass
class TrainConfig(Config):
    """Settings of one training run.

    The global batch of one optimiser step is
    ``micro_batch_size * gradient_accumulation * world_size`` examples. Every
    random draw of a step (noise, times, text dropout) comes from a generator
    seeded by ``(seed, step, micro-batch index in the global batch)``, so any
    split of the global batch over processes and accumulation steps trains the
    same model, and a resumed run repeats an uninterrupted one exactly.

    Args:
        seed: base seed of data order and of every per-step random draw.
        max_steps: optimiser steps of the whole run.
        micro_batch_size: examples per forward pass on one process.
        gradient_accumulation: micro-batches accumulated per optimiser step.
        loss_averaging: what a loss term's mean is taken over, for tasks that count their
            targets (`nextstep.training.task.TrainingTask.target_counts`; the text-to-image
            task counts text and image targets). ``step`` (the default): every target of
            the optimiser step counts the same, so accumulation and several processes train
            on the loss of one big batch. ``micro_batch``: each micro-batch's own mean, the
            micro-batches weighing the same whatever their numbers of targets (plain
            gradient accumulation and DDP averaging).
        learning_rate: peak learning rate.
        min_learning_rate: learning rate where the cosine decay ends, at ``max_steps``
            (the last step, ``max_steps - 1``, runs just above it).
        warmup_steps: linear warm-up to ``learning_rate``: step ``s`` (from 0) runs at
            ``(s + 1) / warmup_steps`` of it.
        betas: AdamW betas.
        eps: AdamW epsilon.
        weight_decay: decoupled weight decay of matrices (biases, norms and other
            1-d parameters are not decayed).
        grad_clip: maximum global gradient norm; 0 disables clipping.
        precision: ``fp32``, ``bf16`` (autocast) or ``auto`` (bf16 on CUDA with
            bf16 support, fp32 elsewhere).
        gradient_checkpointing: recompute backbone activations in the backward pass.
        ema_decay: decay of the exponential moving average of the weights;
            0 keeps no average.
        text_dropout: chance that a pair is ordered image-first (the image is
            modelled without its caption, which classifier-free guidance needs);
            None keeps the model's ``image_first_probability``.
        context_noise: largest scale of the Gaussian noise added to the image
            tokens the transformer reads as context (targets stay clean); each
            sequence draws its scale from U(0, context_noise). 0 (the default, as in
            NextStep-1) trains on clean context. Makes sampling robust to the
            small errors of its own earlier tokens.
        pack_length: pack the sequences of each micro-batch into rows of at most
            this many tokens, each attending within itself only (as the NextStep-1
            release packs to 8192); None (the default) puts one sequence in each
            row, padded to the longest. The losses have the same targets either
            way (`nextstep.sequence.SequenceBuilder.pack`); packing saves the padding.
        log_every: steps between rows of the loss log.
        sample_every: steps between sample grids; 0 writes none.
        sample_prompts: prompts of the sample grids.
        sample_height: pixel height of sample images.
        sample_width: pixel width of sample images.
        sample_cfg: guidance scale of sample images.
        sample_steps: flow-head steps per token of sample images.
        checkpoint_every: steps between checkpoints (the last step is always saved).
        keep_last: checkpoints kept on disk; older ones are deleted.
        tensorboard: also write TensorBoard event files (needs the ``tensorboard`` package).
        num_workers: data-loading worker processes per training process.
        parallelism: ``ddp`` (replicated weights) or ``fsdp`` (weights, gradients
            and optimiser state sharded with ``fully_shard``) when launched on
            several processes.
        max_bad_fraction: the run fails once more than this fraction of the
            samples read turned out unreadable.
        compile: compile the model's forward with ``torch.compile``
            (`nextstep.compile.CompileConfig`; off by default). Compilation that
            fails warns and trains eagerly instead.
    """

    seed: int = 0
    max_steps: int = 1000
    micro_batch_size: int = 8
    gradient_accumulation: int = 1
    loss_averaging: str = "step"
    learning_rate: float = 1e-4
    min_learning_rate: float = 0.0
    warmup_steps: int = 5000
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    precision: str = "auto"
    gradient_checkpointing: bool = False
    ema_decay: float = 0.0
    text_dropout: float | None = None
    context_noise: float = 0.0
    pack_length: int | None = None
    log_every: int = 10
    sample_every: int = 0
    sample_prompts: tuple[str, ...] = ()
    sample_height: int = 64
    sample_width: int = 64
    sample_cfg: float = 3.0
    sample_steps: int = 20
    checkpoint_every: int = 1000
    keep_last: int = 3
    tensorboard: bool = False
    num_workers: int = 0
    parallelism: str = "ddp"
    max_bad_fraction: float = 0.01
    compile: CompileConfig = field(default_factory=CompileConfig)

    def validate(self) -> None:
        for name in ("max_steps", "micro_batch_size", "gradient_accumulation", "log_every",
                     "checkpoint_every", "keep_last", "sample_height", "sample_width",
                     "sample_steps"):
            require(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name,
                    getattr(self, name), "an integer >= 1")
        require(isinstance(self.seed, int) and not isinstance(self.seed, bool) and 0 <= self.seed < 2 ** 63,
                "seed", self.seed, "an integer in [0, 2**63)")
        for name in ("warmup_steps", "sample_every", "num_workers"):
            require(isinstance(getattr(self, name), int) and getattr(self, name) >= 0, name,
                    getattr(self, name), "an integer >= 0")
        require(self.learning_rate > 0, "learning_rate", self.learning_rate, "positive")
        require(0 <= self.min_learning_rate <= self.learning_rate, "min_learning_rate",
                self.min_learning_rate, f"in [0, learning_rate={self.learning_rate}]")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", self.betas,
                "two numbers in [0, 1)")
        require(self.eps > 0, "eps", self.eps, "positive")
        require(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        require(self.grad_clip >= 0, "grad_clip", self.grad_clip, ">= 0 (0 disables clipping)")
        require(self.precision in PRECISIONS, "precision", self.precision, f"one of {list(PRECISIONS)}")
        require(0 <= self.ema_decay < 1, "ema_decay", self.ema_decay, "in [0, 1) (0 disables EMA)")
        require(self.text_dropout is None or 0 <= self.text_dropout <= 1, "text_dropout",
                self.text_dropout, "None or in [0, 1]")
        require(self.context_noise >= 0, "context_noise", self.context_noise, ">= 0")
        check_scale("sample_cfg", self.sample_cfg)
        require(self.pack_length is None or (isinstance(self.pack_length, int) and self.pack_length >= 1),
                "pack_length", self.pack_length, "None or an integer >= 1")
        require(self.loss_averaging in LOSS_AVERAGINGS, "loss_averaging", self.loss_averaging,
                f"one of {list(LOSS_AVERAGINGS)}")
        require(self.parallelism in PARALLELISMS, "parallelism", self.parallelism,
                f"one of {list(PARALLELISMS)}")
        require(0 <= self.max_bad_fraction < 1, "max_bad_fraction", self.max_bad_fraction, "in [0, 1)")
