"""Few-step, guidance-free image heads distilled from a model's own sampling.

The teacher is the model as it samples: its head on every guidance branch,
combined by classifier-free guidance, integrated over S steps by its sampler.
The student is a copy of the head, fine-tuned so that one Euler step per
segment of a K-step grid lands where the teacher's S steps land, from the
prompt branch's condition ``c`` alone. Two objectives (``objective``):

* ``"segments"``: each segment on its own, at the teacher's state ``x_k`` at
  time ``t_k``, regresses the segment's mean velocity

      v_student(x_k, t_k, c) ~ (x_{k+1} - x_k) / (t_{k+1} - t_k);

* ``"rollout"``: the student runs its own K Euler steps from the token's noise,
  ``y_0 = x_0``, ``y_{k+1} = y_k + (t_{k+1} - t_k) v_student(y_k, t_k, c)``, and
  each state it reaches is compared with the teacher's in velocity units,
  ``|y_{k+1} - x_{k+1}|^2 / (t_{k+1} - t_k)^2``, with gradients through the
  earlier steps: it learns from the states it will itself be in when sampling,
  and to make up for its own earlier errors. Its first step's term is the
  segment loss; a token costs K head evaluations instead of one.

The distilled model then samples with K Euler steps and no unconditional
branch: K head evaluations per token instead of S x (evaluations per step) x 2,
and half the backbone rows. It is tied to that grid and that guidance scale:
other step counts, guidance scales, time shifts (editing) or candidate scores
that read the head's flow are what the teacher does, not what the student
learned.

Legend: M recorded tokens, B tokens of a batch, K student steps, C condition dim, D token dim.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from nextstep.config import ComponentSpec, Config, require, require_count
from nextstep.dtypes import DTYPES
from nextstep.heads.base import ImageHead
from nextstep.samplers.euler import EulerSampler
from nextstep.samplers.guidance import Guidance, GuidedVelocity, NoGuidance, guidance_for_scale
from nextstep.training.optim import WarmupCosineSchedule
from nextstep.training.teacher_trajectories import TeacherTrajectories, record_teacher_trajectories

if TYPE_CHECKING:
    from nextstep.model import NextStep

DISTILLATION_OBJECTIVES = ("segments", "rollout")
"""What the student is fitted to (see the module's description)."""


@dataclass
class HeadDistillationConfig(Config):
    """What the student learns and how.

    Args:
        steps: K, Euler steps per token of the student.
        teacher_steps: S, the teacher's steps per token (a multiple of K, so that the student's grid
            is part of the teacher's).
        cfg: the teacher's guidance scale, folded into the student (None: the model's own).
        images_per_prompt: teacher images drawn per prompt.
        generation_batch_size: teacher images generated together.
        condition_dtype: the dtype the recorded conditions are kept in (``"float32"``,
            ``"bfloat16"`` or ``"float16"``): C of the C + (K + 2) x D numbers kept per token.
        objective: ``"segments"`` (each segment at the teacher's state) or ``"rollout"`` (the
            student's own K steps from the noise, compared with the teacher's states).
        iterations: optimiser steps of the student.
        batch_size: token segments per optimiser step: that many (token, segment) pairs for
            ``"segments"``, ``batch_size // steps`` whole tokens (at least one) for ``"rollout"``,
            so that a step costs the same head evaluations either way.
        learning_rate: peak AdamW rate (cosine decay to zero after 5% warm-up).
        validation_fraction: share of the teacher's images kept out of training and scored.
        seed: seed of the teacher's image 0, of the pairs drawn and of the split.
    """

    steps: int = 4
    teacher_steps: int = 20
    cfg: float | None = None
    images_per_prompt: int = 1
    generation_batch_size: int = 16
    condition_dtype: str = "float32"
    objective: str = "segments"
    iterations: int = 4000
    batch_size: int = 1024
    learning_rate: float = 3e-4
    validation_fraction: float = 0.1
    seed: int = 0

    def validate(self) -> None:
        for name in ("steps", "teacher_steps", "images_per_prompt", "generation_batch_size", "iterations",
                     "batch_size"):
            require_count(name, getattr(self, name))
        require(self.teacher_steps % self.steps == 0, "teacher_steps", self.teacher_steps,
                f"a multiple of steps ({self.steps}), so that every student time is a teacher time")
        require(self.condition_dtype in DTYPES, "condition_dtype", self.condition_dtype, f"one of {list(DTYPES)}")
        require(self.objective in DISTILLATION_OBJECTIVES, "objective", self.objective,
                f"one of {list(DISTILLATION_OBJECTIVES)}")
        require(self.cfg is None or 0 <= self.cfg < math.inf, "cfg", self.cfg, "None or a finite number >= 0")
        require(0 < self.learning_rate < math.inf, "learning_rate", self.learning_rate, "a positive number")
        require(0 <= self.validation_fraction < 1, "validation_fraction", self.validation_fraction, "in [0, 1)")
        require(self.seed >= 0, "seed", self.seed, ">= 0")


@dataclass
class HeadDistillation:
    """A distilled head and how well it follows its teacher.

    Attributes:
        head: the student, a copy of the model's head in its dtype and on its device (eval mode).
        steps: K, the Euler steps the student samples with.
        report: plain numbers: the settings, ``losses`` (mean loss of every tenth of the run),
            and on the held-out images the root-mean-square distance of sampled tokens to the
            teacher's: ``student_rmse`` (the student, K Euler steps, no guidance),
            ``initial_rmse`` (the undistilled head the same way), ``teacher_rmse_at_steps``
            (the teacher with its guidance and sampler at K steps), with ``token_rms`` (the
            teacher's tokens' own scale) to compare them with.
    """

    head: ImageHead
    steps: int
    report: dict[str, Any] = field(default_factory=dict)


def resolve_teacher_guidance(model: "NextStep", cfg: float | None) -> Guidance:
    """The teacher's guidance: CFG at ``cfg`` (the model's scale when None) with a constant schedule.

    Raises:
        ValueError: the model's default guidance changes over an image's tokens (the student has no
            input for a token's place in its image).
    """
    defaults = model.config.generation
    if defaults.cfg_schedule != "constant":
        raise ValueError(f"distillation folds a constant guidance scale into the head; the model's "
                         f"cfg_schedule is {defaults.cfg_schedule!r} (the student has no input for a token's "
                         "place in its image)")
    return guidance_for_scale(defaults.cfg if cfg is None else cfg)


def _student_velocity_targets(trajectories: TeacherTrajectories, tokens: torch.Tensor, segments: torch.Tensor):
    """Inputs and targets of (token, segment) pairs: x_k (P, D), t_k (P,), condition (P, C), mean velocity (P, D)."""
    states, times = trajectories.states, trajectories.times
    start, end = states[tokens, segments], states[tokens, segments + 1]
    width = (times[segments + 1] - times[segments])[:, None]
    return start, times[segments], trajectories.conditions[tokens], (end - start) / width


def segment_loss(head: ImageHead, trajectories: TeacherTrajectories, tokens: torch.Tensor,
                 segments: torch.Tensor) -> torch.Tensor:
    """Mean squared error of ``head``'s velocity at the teacher's states against each segment's mean velocity.

    Args:
        head: the student.
        trajectories: the teacher's tokens.
        tokens: (P,) recorded token of each pair.
        segments: (P,) segment of each pair, in [0, K).

    Returns:
        the loss, a float32 scalar.
    """
    device = next(head.parameters()).device
    x, t, condition, target = (value.to(device, torch.float32)
                               for value in _student_velocity_targets(trajectories, tokens, segments))
    return (head.velocity(x, t, condition).float() - target).pow(2).mean()


def rollout_loss(head: ImageHead, trajectories: TeacherTrajectories, tokens: torch.Tensor) -> torch.Tensor:
    """Mean over the K steps of ``head``'s own Euler run from the noise of the squared distance to the
    teacher's state after each step, divided by that step's width squared (velocity units).

    Args:
        head: the student.
        trajectories: the teacher's tokens.
        tokens: (B,) recorded tokens.

    Returns:
        the loss, a float32 scalar; with K = 1 it is `segment_loss` of segment 0.
    """
    device = next(head.parameters()).device
    states = trajectories.states[tokens].to(device)  # (B, K + 1, D)
    condition = trajectories.conditions[tokens].to(device, torch.float32)
    times = trajectories.times.to(device)
    x, total = states[:, 0], 0.0
    for step in range(trajectories.student_steps):
        width = times[step + 1] - times[step]
        x = x + width * head.velocity(x, times[step].expand(x.shape[0]), condition).float()
        total = total + ((x - states[:, step + 1]) / width).pow(2).mean()
    return total / trajectories.student_steps


@torch.no_grad()
def sampled_rmse(head: ImageHead, trajectories: TeacherTrajectories, sampler, grid: torch.Tensor,
                 batch: int = 4096) -> float:
    """Root-mean-square distance between the teacher's tokens and ``sampler`` on ``grid`` from the same
    noise, with ``head`` on the recorded conditions and no guidance."""
    parameter = next(head.parameters())
    total, count = 0.0, 0
    for start in range(0, trajectories.num_tokens, batch):
        rows = slice(start, start + batch)
        conditions = trajectories.conditions[None, rows].to(parameter.device, parameter.dtype)
        velocity = GuidedVelocity(head, conditions, NoGuidance())
        noise = trajectories.states[rows, 0].to(parameter.device)
        tokens = sampler.sample(velocity, noise, grid.to(parameter.device)).float().cpu()
        total += (tokens - trajectories.states[rows, -1]).pow(2).sum().item()
        count += tokens.numel()
    return math.sqrt(total / max(count, 1))


def train_student(
    head: ImageHead,
    trajectories: TeacherTrajectories,
    config: HeadDistillationConfig,
    progress: Callable[[int, int, float], None] | None = None,
) -> tuple[ImageHead, list[float]]:
    """A float32 copy of ``head`` fitted to the segments of ``trajectories``.

    Args:
        head: the teacher's head (left unchanged).
        trajectories: the training tokens.
        config: objective, iterations, batch size, learning rate and seed.
        progress: called with (iteration done, iterations, loss) every 50 iterations and at the end.

    Returns:
        the student (float32, eval mode) and the mean loss of every tenth of the run.
    """
    if trajectories.num_tokens == 0:
        raise ValueError("distillation needs at least one recorded token, found none")
    student = copy.deepcopy(head).float().train()
    student.requires_grad_(True)
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.learning_rate, weight_decay=0.0,
                                  betas=(0.9, 0.99))
    schedule = WarmupCosineSchedule(config.learning_rate, max(config.iterations // 20, 1), config.iterations)
    generator = torch.Generator().manual_seed(config.seed)
    steps, rollout = trajectories.student_steps, config.objective == "rollout"
    drawn_per_iteration = max(config.batch_size // steps, 1) if rollout else config.batch_size
    window = max(config.iterations // 10, 1)
    losses, running = [], []
    for iteration in range(config.iterations):
        schedule.apply(optimizer, iteration)
        if rollout:
            loss = rollout_loss(student, trajectories,
                                torch.randint(trajectories.num_tokens, (drawn_per_iteration,), generator=generator))
        else:
            drawn = torch.randint(trajectories.num_tokens * steps, (drawn_per_iteration,), generator=generator)
            loss = segment_loss(student, trajectories, drawn // steps, drawn % steps)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the student's loss is {loss.item()} at iteration {iteration}; "
                                     f"lower learning_rate (found {config.learning_rate})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running.append(loss.item())
        if len(running) == window or iteration == config.iterations - 1:
            losses.append(sum(running) / len(running))
            running = []
        if progress is not None and ((iteration + 1) % 50 == 0 or iteration == config.iterations - 1):
            progress(iteration + 1, config.iterations, loss.item())
    student.requires_grad_(False)
    return student.eval(), losses


def _split_by_image(trajectories: TeacherTrajectories, fraction: float, seed: int):
    """(training, held-out) trajectories, whole images on each side; held-out empty when ``fraction`` is 0."""
    images = trajectories.images.unique()
    held = max(1, round(fraction * images.numel())) if fraction > 0 and images.numel() > 1 else 0
    if held >= images.numel() > 0:
        raise ValueError(f"validation_fraction {fraction} holds out {held} of the {images.numel()} recorded images, "
                         "leaving none to train on: lower it, or record more images")
    order = images[torch.randperm(images.numel(), generator=torch.Generator().manual_seed(seed))]
    held_out = torch.isin(trajectories.images, order[:held])
    return trajectories.select(~held_out), trajectories.select(held_out)


def record_for_distillation(
    model: "NextStep",
    prompts: Sequence[str],
    config: HeadDistillationConfig | None = None,
    *,
    height: int | None = None,
    width: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> TeacherTrajectories:
    """The teacher's recording that ``config`` asks for: ``images_per_prompt`` images of every prompt
    (image ``i`` seeded ``seed + i``) with the model's sampler at ``teacher_steps``, its guidance at
    ``cfg``, the states at the ``steps``-step grid, conditions in ``condition_dtype``.

    Args:
        model: the teacher, sampling with its own sampler (deterministic) and head.
        prompts: the prompts its images are drawn for (training prompts, not evaluation ones).
        config: see `HeadDistillationConfig`.
        height: image height in pixels (default: the model's).
        width: image width in pixels (default: the model's).
        progress: called with (images done, images in all) after each batch.
    """
    config = config or HeadDistillationConfig()
    return record_teacher_trajectories(
        model, [prompt for prompt in prompts for _ in range(config.images_per_prompt)], student_steps=config.steps,
        teacher_steps=config.teacher_steps, guidance=resolve_teacher_guidance(model, config.cfg), height=height,
        width=width, seed=config.seed, batch_size=config.generation_batch_size,
        condition_dtype=DTYPES[config.condition_dtype], progress=progress)


def distill_head(
    model: "NextStep",
    prompts: Sequence[str],
    config: HeadDistillationConfig | None = None,
    *,
    height: int | None = None,
    width: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> HeadDistillation:
    """Record the model's sampling on ``prompts`` and fit a K-step student head to it.

    The model is left unchanged; `install_distilled_head` puts the student in.
    This is `record_for_distillation` then `fit_distilled_head`: to fit several
    students (objectives, iterations, learning rates) to one recording, or to
    keep it (`TeacherTrajectories.save`), call the two yourself.

    Args:
        model: the teacher, sampling with its own sampler (deterministic) and head.
        prompts: the prompts its images are drawn for (training prompts, not evaluation ones).
        config: see `HeadDistillationConfig`.
        height: image height in pixels (default: the model's).
        width: image width in pixels (default: the model's).
        progress: called with (stage, done, total): ``"teacher"`` per batch of images,
            ``"student"`` every 50 iterations.
    """
    config = config or HeadDistillationConfig()
    started = time.perf_counter()
    trajectories = record_for_distillation(
        model, prompts, config, height=height, width=width,
        progress=None if progress is None else (lambda done, total: progress("teacher", done, total)))
    recorded = time.perf_counter() - started
    distilled = fit_distilled_head(
        model, trajectories, config,
        progress=None if progress is None else (lambda done, total: progress("student", done, total)))
    distilled.report["seconds"] = {"teacher": round(recorded, 2), **distilled.report["seconds"]}
    return distilled


def fit_distilled_head(
    model: "NextStep",
    trajectories: TeacherTrajectories,
    config: HeadDistillationConfig | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> HeadDistillation:
    """Fit a K-step student of ``model``'s head to recorded ``trajectories`` and score it on held-out images.

    Args:
        model: the teacher the trajectories were recorded from (left unchanged).
        trajectories: from `record_for_distillation` (or `TeacherTrajectories.load`) with ``config``'s
            steps and teacher steps.
        config: see `HeadDistillationConfig`; its recording settings (``cfg``, ``images_per_prompt``,
            ``generation_batch_size``, ``condition_dtype``) are the trajectories' business and not read here.
        progress: called with (iterations done, iterations) every 50 iterations.

    Raises:
        ValueError: naming both, when the trajectories were recorded for other student or teacher steps,
            or from a model whose head reads other condition or token widths.
    """
    config = config or HeadDistillationConfig()
    if (trajectories.student_steps, trajectories.teacher_steps) != (config.steps, config.teacher_steps):
        raise ValueError(f"the config asks for {config.steps} student steps from {config.teacher_steps} teacher "
                         f"steps, the trajectories were recorded for {trajectories.student_steps} from "
                         f"{trajectories.teacher_steps}")
    head = model.image_head
    recorded_widths = (trajectories.conditions.shape[-1], trajectories.states.shape[-1])
    if recorded_widths != (head.condition_dim, head.token_dim):
        raise ValueError(f"the trajectories come from another model: expected conditions of width "
                         f"{head.condition_dim} and tokens of width {head.token_dim} (this model's head), found "
                         f"{recorded_widths[0]} and {recorded_widths[1]}")
    started = time.perf_counter()
    training, held_out = _split_by_image(trajectories, config.validation_fraction, config.seed)
    student, losses = train_student(
        head, training, config, None if progress is None else (lambda done, total, loss: progress(done, total)))
    trained = time.perf_counter() - started
    guidance, teacher = trajectories.guidance, trajectories.teacher_sampler
    euler, grid = EulerSampler(), trajectories.times
    report: dict[str, Any] = {
        "steps": config.steps, "teacher_steps": config.teacher_steps, "teacher_sampler": type(teacher).__name__,
        "cfg": float(getattr(guidance, "scale", 1.0)), "objective": config.objective,
        "images": int(trajectories.images.unique().numel()), "tokens": trajectories.num_tokens,
        "held_out_tokens": held_out.num_tokens, "iterations": config.iterations, "batch_size": config.batch_size,
        "learning_rate": config.learning_rate, "losses": losses,
        "head_evaluations_per_token": {
            "teacher": config.teacher_steps * teacher.evaluations_per_step * guidance.num_branches,
            "student": config.steps},
        "seconds": {"student": round(trained, 2)},
    }
    parameter = next(head.parameters())
    student = student.to(parameter.device, parameter.dtype)  # as it is installed: measured in the model's dtype
    if held_out.num_tokens:
        tokens = held_out.states[:, -1]
        report["token_rms"] = tokens.pow(2).mean().sqrt().item()
        report["student_rmse"] = sampled_rmse(student, held_out, euler, grid)
        report["initial_rmse"] = sampled_rmse(head, held_out, euler, grid)
        report["teacher_rmse_at_steps"] = (held_out.teacher_at_steps - tokens).pow(2).mean().sqrt().item()
    return HeadDistillation(student, config.steps, report)


def install_distilled_head(model: "NextStep", distilled: HeadDistillation) -> "NextStep":
    """Put a distilled head into ``model`` in place, with what it samples with: the Euler sampler,
    ``steps`` steps, guidance 1 (the student holds the teacher's), one candidate. Returns ``model``."""
    if type(distilled.head) is not type(model.image_head):
        raise ValueError(f"the distilled head is a {type(distilled.head).__name__}, the model's a "
                         f"{type(model.image_head).__name__}")
    model.image_head.load_state_dict(distilled.head.state_dict())
    model.sampler = EulerSampler()
    generation = model.config.generation.replace(cfg=1.0, cfg_schedule="constant", num_steps=distilled.steps,
                                                 candidates=1)
    fitted = {"steps": distilled.steps, **({"teacher_cfg": distilled.report["cfg"]} if "cfg" in distilled.report
                                             else {})}
    model.config = model.config.replace(generation=generation, sampler=ComponentSpec.named("sampler", "euler"),
                                        distilled_head=fitted)
    return model
