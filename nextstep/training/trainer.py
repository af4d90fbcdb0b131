"""`Trainer`: the generic loop (accumulation, clipping, AdamW, schedule, EMA, checkpoints, logs).

The loop works on any `TrainingTask`. Randomness of step ``s``, micro-batch
slot ``j`` comes from one generator seeded with ``(seed, s, j)``; the data
position is a function of the step; the optimiser, EMA and generator states are
checkpointed. A resumed run therefore repeats the uninterrupted one exactly,
and a run on ``W`` processes with ``A`` accumulation steps equals one process
with ``W * A`` accumulation steps.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from nextstep.compile import compile_module
from nextstep.images import image_grid
from nextstep.io import atomic_path
from nextstep.training.checkpointing import CheckpointManager, WriteHook, checkpoint_name
from nextstep.training.config import TrainConfig
from nextstep.training.data.loader import BatchLayout, mix_seed
from nextstep.training.data.quality import BadSampleTracker
from nextstep.training.data.source import TrainingData
from nextstep.training.distributed import DistributedContext, full_tensor
from nextstep.training.ema import ExponentialMovingAverage
from nextstep.training.logging import CSVLog, Progress, TensorBoardLog
from nextstep.training.optim import WarmupCosineSchedule, build_optimizer
from nextstep.training.task import TrainingTask

#: Optimiser settings a resumed run takes from its config rather than from the checkpoint.
OPTIMIZER_SETTINGS = ("betas", "eps", "weight_decay")

logger = logging.getLogger("nextstep.training")

LOG_FILE = "train_log.csv"
SAMPLES_DIR = "samples"
CHECKPOINTS_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"
#: Where a run that starts over (``fit(resume=False)``) moves what an earlier run left: ``earlier-runs/1/``, ...
EARLIER_RUNS_DIR = "earlier-runs"
#: What a run writes as it trains, and a run that starts over sets aside.
RUN_ENTRIES = (CHECKPOINTS_DIR, LOG_FILE, TENSORBOARD_DIR, SAMPLES_DIR)


def set_aside_earlier_run(output_dir: str | Path, names: tuple[str, ...] = RUN_ENTRIES,
                          context: DistributedContext | None = None) -> Path | None:
    """Move what an earlier run left in ``output_dir`` (the entries ``names``: by default its
    checkpoints, logs and samples) into ``earlier-runs/<n>/``, the next free ``n``; returns that folder,
    or None when there was nothing (or on a process other than the main one).

    A run that starts over then neither mixes with the earlier checkpoints (which pruning, by step,
    would keep over its own, and a later resume would pick) nor overwrites their log.
    """
    if context is not None and not context.is_main:
        return None
    output_dir = Path(output_dir)
    entries = [output_dir / name for name in names if (output_dir / name).exists()]
    if not entries:
        return None
    target = _new_earlier_run_folder(output_dir)
    for entry in entries:
        os.replace(entry, target / entry.name)
    logger.info("starting over: the earlier run's %s moved to %s", ", ".join(e.name for e in entries), target)
    return target


def _metric_value(name: str, value) -> float:
    """A task's metric as a float: a number, or a one-element tensor (read without its graph)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.detach())
    if isinstance(value, numbers.Real) and not isinstance(value, bool):  # NumPy scalars too
        return float(value)
    raise ValueError(f"metric {name!r} must be a number or a one-element tensor, found "
                     f"{type(value).__name__}{tuple(value.shape) if isinstance(value, torch.Tensor) else ''}")


def _new_earlier_run_folder(output_dir: Path) -> Path:
    """``output_dir/earlier-runs/<n>/``, created, for the next free ``n``."""
    earlier = output_dir / EARLIER_RUNS_DIR
    taken = [int(child.name) for child in earlier.iterdir() if child.name.isdigit()] if earlier.is_dir() else []
    target = earlier / str(max(taken, default=0) + 1)
    target.mkdir(parents=True)
    return target


@dataclass
class StepRecord:
    """The logged numbers of one optimiser step, over all its micro-batches and processes (``epoch``:
    the data epoch it drew from, as this process saw it)."""

    step: int
    loss: float
    metrics: dict[str, float]
    learning_rate: float
    grad_norm: float
    tokens: int
    seconds: float
    epoch: int = 0


def autocast_context(precision: str, device: torch.device):
    """bf16 autocast for ``bf16`` (and for ``auto`` on a CUDA ``device`` that computes in bf16 natively, not
    through emulation as pre-Ampere GPUs would); otherwise none."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda" and native_bf16(device))
    if use_bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def native_bf16(device: torch.device) -> bool:
    """Whether the CUDA ``device`` computes in bf16 natively (compute capability 8.0 and later)."""
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


class Trainer:
    """Trains a task's model on a data source.

    Files under ``output_dir``: ``train_log.csv`` (and ``tensorboard/``),
    ``samples/step-XXXXXXXX.png`` and ``checkpoints/step-XXXXXXXX/``.

    Args:
        task: the model and its loss.
        data: the training data.
        config: the run's numbers.
        output_dir: where logs, samples and checkpoints go.
        context: this process's place in a distributed job (default: a single process).
        show_progress: draw a progress bar (rank 0 only).
        checkpoint_write_hook: passed to `CheckpointManager` (tests use it).
    """

    def __init__(
        self,
        task: TrainingTask,
        data: TrainingData,
        config: TrainConfig,
        output_dir: str | Path,
        *,
        context: DistributedContext | None = None,
        show_progress: bool = True,
        checkpoint_write_hook: WriteHook | None = None,
    ):
        if config.sample_every:  # refused now, not at the first sample step
            if task.samples_from_prompts and not config.sample_prompts:
                raise ValueError(f"train.sample_prompts must be at least one prompt when sample_every > 0 "
                                 f"({type(task).__name__} draws its samples from them), found "
                                 f"{tuple(config.sample_prompts)!r}")
            task.check_sample_settings(config.sample_height, config.sample_width)
        task.check_checkpoint_files()  # and not at the first checkpoint
        self.task = task
        self.data = data
        self.config = config
        self.output_dir = Path(output_dir)
        self.context = context or DistributedContext()
        self.show_progress = show_progress
        self.layout = BatchLayout(config.micro_batch_size, config.gradient_accumulation, self.context.world_size)
        self.model = task.model.to(self.context.device)
        if config.gradient_checkpointing:
            task.enable_gradient_checkpointing()
        self.model.train()
        compile_module(self.model, config.compile)  # nothing unless config.compile.enabled
        self.module = self.context.wrap(self.model, config.parallelism, task.shard_units(),
                                        task.unsharded_parameters())
        self.optimizer = build_optimizer(self.model, config)
        # A step counts its targets (all its micro-batches prepared before the first forward pass), or
        # prepares each micro-batch as its turn comes (one at a time in memory).
        self._counts_step_targets = config.loss_averaging == "step" and task.names_target_counts
        self.schedule = WarmupCosineSchedule.from_config(config)
        if config.warmup_steps >= config.max_steps and self.context.is_main:
            logger.warning("train.warmup_steps %d is not below train.max_steps %d: the run ends in its warm-up, at "
                           "%.3g of the peak learning rate, and never follows the cosine (lower warmup_steps)",
                           config.warmup_steps, config.max_steps, self.schedule.rate(config.max_steps - 1) /
                           config.learning_rate)
        self.ema = ExponentialMovingAverage(self.model, config.ema_decay) if config.ema_decay > 0 else None
        self.checkpoints = CheckpointManager(self.output_dir / CHECKPOINTS_DIR, config.keep_last, self.context,
                                             write_hook=checkpoint_write_hook)
        self.tracker = BadSampleTracker(config.max_bad_fraction, data.size, data.known_bad)
        self.step = 0
        self.history: list[StepRecord] = []
        self._elapsed_before = 0.0  # seconds of training in earlier calls of `fit` (or before a resume)
        self._fit_started: float | None = None
        self._opened_data = None
        self._resumed = False

    # ---------------------------------------------------------------- resume
    def resume(self, checkpoint: str | Path | None = None) -> int:
        """Restore the latest checkpoint (or ``checkpoint``); returns the step to continue from.

        A checkpoint this run cannot continue (another seed, global batch, ..., or files that do not fit
        the model) is refused before anything of it is loaded (for a sharded model, whose files are checked
        as each part loads, as the parts load): the model, optimiser and average are as they were, and a
        later `fit` tries to resume again (from the latest checkpoint)."""
        self.checkpoints.remove_stale()
        path = Path(checkpoint) if checkpoint is not None else self.checkpoints.latest()
        if path is None:
            self._resumed = True
            return self.step
        state = self.checkpoints.read_state(path)
        self._check_resumable(path, state)
        # The run's own betas, eps and weight decay, not the saved ones (the rate follows the schedule).
        settings = [{key: group[key] for key in OPTIMIZER_SETTINGS} for group in self.optimizer.param_groups]
        self.checkpoints.load(path, self.model, self.optimizer, ema=self.ema, trainer_state=state)
        for group, own in zip(self.optimizer.param_groups, settings):
            group.update(own)
        self.tracker.load_state_dict(self._own_bad_samples(state.get("bad_samples", {})))
        self.step = int(state["step"])
        self._elapsed_before = float(state.get("elapsed_seconds", 0.0))
        self._set_aside_later_checkpoints()
        self._resumed = True
        logger.info("resumed from %s at step %d", path, self.step)
        return self.step

    def _check_resumable(self, path: Path, state: dict) -> None:
        """Raise ``ValueError`` when the checkpoint at ``path`` (its trainer ``state``) cannot be continued by
        this run, naming what differs; warn where it continues otherwise than it would have."""
        saved_batch = state.get("global_batch_size")
        if saved_batch is not None and saved_batch != self.layout.global_batch_size:
            raise ValueError(
                f"checkpoint {path} was trained with a global batch of {saved_batch} examples but this run "
                f"has {self.layout.global_batch_size} (micro_batch_size x gradient_accumulation x "
                "processes); keep the global batch to resume the same data order"
            )
        saved_seed = (state.get("config") or {}).get("seed")
        if saved_seed is not None and saved_seed != self.config.seed:
            raise ValueError(
                f"checkpoint {path} was trained with seed {saved_seed} but this run has seed {self.config.seed}; "
                "keep the seed to resume the same data order and draws, or start over (--no-resume)"
            )
        saved_config = state.get("config") or {}
        # Checkpoints from before the setting averaged each micro-batch apart.
        saved_averaging = saved_config.get("loss_averaging", "micro_batch") if saved_config else None
        if (saved_averaging is not None and saved_averaging != self.config.loss_averaging
                and self.layout.global_batch_size > self.config.micro_batch_size and self.task.counts_targets):
            raise ValueError(
                f"checkpoint {path} was trained with loss_averaging {saved_averaging!r} but this run has "
                f"{self.config.loss_averaging!r}, which weighs the micro-batches of a step otherwise; set "
                f"train.loss_averaging={saved_averaging} to resume it, or start over (--no-resume)"
            )
        if self.data.streaming and "num_workers" in saved_config and "world_size" in state:
            # A stream is dealt to processes x loader workers readers, each cutting micro-batches from its
            # share: another split reads other samples, and resumes at another point of the stream.
            saved = (int(state["world_size"]), max(int(saved_config["num_workers"]), 1),
                     int(saved_config.get("micro_batch_size", self.config.micro_batch_size)))
            here = (self.context.world_size, max(self.config.num_workers, 1), self.config.micro_batch_size)
            if saved != here:
                raise ValueError(
                    f"checkpoint {path} read its stream with {saved[0]} process(es) x {saved[1]} loader worker(s) "
                    f"in micro-batches of {saved[2]} but this run has {here[0]} x {here[1]} in micro-batches of "
                    f"{here[2]}; a streaming dataset resumes only with the same split (map-style datasets "
                    "resume on any)"
                )
        saved_micro_batch = saved_config.get("micro_batch_size")
        if saved_micro_batch is not None and saved_micro_batch != self.config.micro_batch_size \
                and not self.data.streaming:
            logger.warning("checkpoint %s was trained in micro-batches of %d examples and this run takes %d: the "
                           "same examples make each step, but each micro-batch draws its own noise and times, so "
                           "the run does not continue exactly as it would have (keep micro_batch_size for that)",
                           path, saved_micro_batch, self.config.micro_batch_size)
        if int(state["step"]) > self.config.max_steps:
            raise ValueError(
                f"checkpoint {path} is at step {int(state['step'])}, past this run's max_steps "
                f"{self.config.max_steps}; raise train.max_steps to go on, use an earlier checkpoint (each "
                "checkpoint folder loads as a model), or start over (--no-resume)"
            )

    def _set_aside_later_checkpoints(self) -> None:
        """Move the checkpoints after the step resumed from (a run resumed from an earlier checkpoint
        abandons them) into ``earlier-runs/<n>/checkpoints/``: pruning, by step, would otherwise keep
        them over the new ones, and a later rerun would resume from them."""
        if not self.context.is_main:
            return
        later = [step for step in self.checkpoints.steps() if step > self.step]
        if not later:
            return
        target = _new_earlier_run_folder(self.output_dir) / CHECKPOINTS_DIR
        target.mkdir()
        for step in later:
            name = checkpoint_name(step)
            os.replace(self.checkpoints.directory / name, target / name)
        logger.warning("resumed at step %d: the later checkpoints (steps %s) moved to %s", self.step,
                       ", ".join(map(str, later)), target)

    def set_aside_earlier_run(self) -> Path | None:
        """`set_aside_earlier_run` of ``output_dir`` (the main process only)."""
        return set_aside_earlier_run(self.output_dir, context=self.context)

    def _own_bad_samples(self, saved: dict | list) -> dict:
        """The job's bad-sample count from a checkpoint's: a dict, or a list of one per rank (from
        checkpoints whose processes counted apart), taken together."""
        if isinstance(saved, dict):
            return saved
        return {"bad": sorted({key for rank in saved for key in rank.get("bad", [])}),
                "reads": sum(int(rank.get("reads", 0)) for rank in saved)}

    def trainer_state(self) -> dict:
        """What a checkpoint records besides the tensors (every process holds the job's bad-sample count)."""
        return {
            "global_batch_size": self.layout.global_batch_size,
            "world_size": self.context.world_size,
            "bad_samples": self.tracker.state_dict(),
            "elapsed_seconds": self.elapsed_seconds(),
            "config": self.config.to_dict(),
        }

    def save_checkpoint(self) -> Path:
        return self.checkpoints.save(self.step, self.model, self.optimizer, self.trainer_state(), ema=self.ema,
                                     write_extra=self.task.write_checkpoint_files)

    # ------------------------------------------------------------------ loop
    def fit(self, resume: bool = True) -> list[StepRecord]:
        """Train until ``config.max_steps``; returns the records of the steps run now.

        Args:
            resume: continue from the latest checkpoint in ``output_dir`` if there is one (unless
                `resume` was called already); False starts over, setting aside what an earlier run
                left there (`set_aside_earlier_run`).
        """
        if resume and not self._resumed:  # not already by an explicit `resume` call
            self.resume()
        elif not resume and self.step == 0:
            self.set_aside_earlier_run()
        self._resumed = False  # a later `fit` resumes from the latest checkpoint again
        config, context = self.config, self.context
        if self.step >= config.max_steps:
            return []
        self._opened_data = self.data.open(self.layout, rank=context.rank, seed=config.seed,
                                           start_step=self.step, num_workers=config.num_workers)
        batches = iter(self._opened_data)
        csv_log = CSVLog(self.output_dir / LOG_FILE, resume_step=self.step) if context.is_main else None
        board = (TensorBoardLog(self.output_dir / TENSORBOARD_DIR, purge_step=self.step + 1)
                 if config.tensorboard and context.is_main else None)
        progress = Progress(config.max_steps, self.step, enabled=self.show_progress and context.is_main)
        window_tokens, window_start = 0, time.perf_counter()
        self._fit_started = window_start
        records = []
        try:
            while self.step < config.max_steps:
                record = self.train_step(batches)
                records.append(record)
                self.history.append(record)
                window_tokens += record.tokens
                step = self.step
                elapsed = time.perf_counter() - window_start
                progress.update(record.loss, window_tokens / max(elapsed, 1e-9))
                if step % config.log_every == 0 or step == config.max_steps:
                    row = {
                        "step": step,
                        "epoch": record.epoch,
                        "loss": record.loss,
                        **record.metrics,
                        "learning_rate": record.learning_rate,
                        "grad_norm": record.grad_norm,
                        "tokens_per_second": window_tokens / max(elapsed, 1e-9),
                        "elapsed_seconds": self.elapsed_seconds(),
                    }
                    for log in (csv_log, board):
                        if log is not None:
                            log.write(row)
                    window_tokens, window_start = 0, time.perf_counter()
                if step % config.checkpoint_every == 0 or step == config.max_steps:
                    writing = time.perf_counter()
                    self.save_checkpoint()
                    # Not training time: the checkpoint records the clock before its own write, so a run
                    # resumed from it could not count the write, and a run that goes on must not either.
                    written = time.perf_counter() - writing
                    self._fit_started += written
                    window_start += written
                if config.sample_every and step % config.sample_every == 0:  # after the checkpoint, kept
                    self.write_samples()  # whatever drawing them does
        finally:
            self._elapsed_before, self._fit_started = self.elapsed_seconds(), None
            progress.close()
            if board is not None:
                board.close()
        return records

    def elapsed_seconds(self) -> float:
        """Seconds this run has trained, across resumes (up to its last checkpoint before each), not
        counting the time its checkpoints took to write: a run gives the same clock resumed or not."""
        running = time.perf_counter() - self._fit_started if self._fit_started is not None else 0.0
        return self._elapsed_before + running

    def epoch_of(self, step: int, batch_epochs: list[int | None] = ()) -> int:
        """The data epoch that optimiser step ``step`` (0-based) draws from: the latest of its
        micro-batches' ``epoch`` (streams, where the step does not tell it), else the one the opened
        data computes from the step (0 where it tells neither)."""
        named = [epoch for epoch in batch_epochs if epoch is not None]
        if named:
            return max(named)
        epoch_of = getattr(self._opened_data, "epoch_of", None)
        return epoch_of(step) if epoch_of is not None else 0

    def train_step(self, batches: Iterator) -> StepRecord:
        """One optimiser step over ``gradient_accumulation`` micro-batches from ``batches``."""
        config, context = self.config, self.context
        started = time.perf_counter()
        rate = self.schedule.apply(self.optimizer, self.step)
        self.optimizer.zero_grad(set_to_none=True)
        accumulation = config.gradient_accumulation
        loss_sum, tokens, attempted = 0.0, 0, 0
        bad_keys: list[str] = []
        metric_sums: dict[str, float] = {}
        batch_epochs: list[int | None] = []

        def next_micro_batch(index: int) -> tuple:
            """The prepared micro-batch ``index`` of this step and its generator."""
            nonlocal attempted
            batch = next(batches)
            batch_epochs.append(getattr(batch, "epoch", None))
            # Batches of the built-in loaders report unreadable samples; others need not.
            attempted += getattr(batch, "attempted", 0)
            bad_keys.extend(getattr(batch, "bad_keys", ()))
            generator = torch.Generator(device=context.device)
            generator.manual_seed(mix_seed(config.seed, "step", self.step, self.layout.slot(index, context.rank)))
            with autocast_context(config.precision, context.device):
                return self.task.prepare(batch, generator), generator

        ahead = [next_micro_batch(index) for index in range(accumulation)] if self._counts_step_targets else None
        totals = self._step_totals([batch for batch, _ in ahead]) if ahead else None
        for index in range(accumulation):
            batch, generator = ahead[index] if ahead else next_micro_batch(index)
            last = index == accumulation - 1
            sync = nullcontext() if last else context.no_gradient_sync(self.module)
            with sync:
                with autocast_context(config.precision, context.device):
                    if totals is None:
                        result = self.task.loss(self.module, batch, generator)
                    else:
                        result = self.task.loss(self.module, batch, generator, totals=totals)
                # Shares of the step's loss add up over micro-batches; the gradient synchronisation
                # averages over processes, which the world size undoes.
                scale = 1 / accumulation if totals is None else context.world_size
                (result.loss * scale).backward()
            loss_sum += float(result.loss.detach())
            tokens += result.num_tokens
            for name, value in result.metrics.items():
                metric_sums[name] = metric_sums.get(name, 0.0) + _metric_value(name, value)
        # Before the update: a run over the limit stops unchanged.
        total_tokens = self._count_bad_samples(attempted, bad_keys, tokens)
        grad_norm = self._clip_gradients()
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
        names = sorted(metric_sums)
        if totals is None:
            averaged = context.mean([loss_sum / accumulation] + [metric_sums[n] / accumulation for n in names])
        else:
            averaged = context.sum([loss_sum] + [metric_sums[n] for n in names])
        self.step += 1
        loss = averaged[0]
        if not math.isfinite(loss):
            raise FloatingPointError(f"the loss became {loss} at step {self.step}; lower the learning rate "
                                     "or check the data")
        return StepRecord(self.step, loss, dict(zip(names, averaged[1:])), rate, grad_norm, int(total_tokens),
                          time.perf_counter() - started, self.epoch_of(self.step - 1, batch_epochs))

    def _step_totals(self, prepared: list) -> dict[str, float] | None:
        """Each term's number of targets in the step's micro-batches, summed over the processes; None
        when the task names no terms (the loss then averages each micro-batch apart)."""
        counts = [self.task.target_counts(batch) for batch in prepared]
        names = sorted(counts[0])
        if any(sorted(count) != names for count in counts):
            raise ValueError(f"{type(self.task).__name__}.target_counts must name the same terms for every "
                             f"micro-batch, found {[sorted(count) for count in counts]}")
        if not names:
            return None
        summed = self.context.sum([float(sum(count[name] for count in counts)) for name in names])
        return dict(zip(names, summed))

    def _count_bad_samples(self, attempted: int, bad_keys: list[str], tokens: int = 0) -> int:
        """Add every process's reads and unreadable samples of this step to the tracker, so that all
        processes hold the job's count and stop together once it is over the limit; returns the job's
        ``tokens`` of the step, summed in the same collective."""
        total_tokens, total_attempted, total_bad = self.context.sum([float(tokens), float(attempted),
                                                                     float(len(bad_keys))])
        if self.context.is_distributed:
            bad_keys = [key for rank in self.context.gather_objects(bad_keys) for key in rank] if total_bad else []
        self.tracker.update(int(total_attempted), bad_keys)
        return int(total_tokens)

    def _clip_gradients(self) -> float:
        parameters = [p for p in self.model.parameters() if p.grad is not None]
        if not parameters:
            return 0.0
        max_norm = self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm, foreach=False)
        return float(full_tensor(norm))

    # --------------------------------------------------------------- samples
    def write_samples(self) -> Path | None:
        """Write the sample grid of the current step (rank 0); returns its path."""
        config = self.config
        if not self.context.is_main:
            return None
        if any(hasattr(p, "full_tensor") for p in self.model.parameters()):
            logger.warning("sample grids are not drawn for sharded (FSDP) models; load a checkpoint instead")
            return None
        settings = dict(prompts=config.sample_prompts, height=config.sample_height, width=config.sample_width,
                        cfg=config.sample_cfg, num_steps=config.sample_steps, seed=config.seed)
        self.model.eval()
        try:
            with (self.ema.applied_to(self.model) if self.ema is not None else nullcontext()):
                images = self.task.sample_images(**settings)
        finally:
            self.model.train()
        if not images:
            return None
        path = self.output_dir / SAMPLES_DIR / f"step-{self.step:08d}.png"
        with atomic_path(path) as tmp:
            image_grid(images).save(tmp, format="PNG")
        return path
