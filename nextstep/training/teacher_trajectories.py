"""What a model's own sampling does to each image token, recorded for distilling its head.

A teacher (the model with its guidance and its sampler at many steps) generates
images from prompts; for every image token this keeps the backbone's condition
of the prompt branch (the one a guidance-free student reads), the starting
noise, the teacher's state at the boundaries of a coarser grid (the grid a
few-step student will run on, `nextstep.training.head_distillation`) and, to
compare the student with, the token the teacher itself draws on that coarser
grid. Per token that is C + (K + 2) x D numbers, the conditions in a dtype of
the caller's choice; they are moved off the model's device batch by batch.

Legend: M recorded tokens, C condition dim, D token dim, K student steps (the
teacher's grid split into K segments).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from nextstep.config import ComponentSpec
from nextstep.samplers.base import Sampler, VelocityFn, check_time_grid
from nextstep.samplers.euler import EulerSampler
from nextstep.samplers.guidance import (
    ClassifierFreeGuidance,
    Guidance,
    GuidedVelocity,
    NoGuidance,
    guidance_for_scale,
)

if TYPE_CHECKING:
    from nextstep.model import NextStep


@dataclass
class TeacherTrajectories:
    """Recorded tokens of a teacher's generations.

    Attributes:
        conditions: (M, C) condition of the prompt branch (the dtype the recording asked for).
        states: (M, K + 1, D) float32 teacher state at each time of ``times``: the starting
            noise first, the sampled token (before any ``use_norm``) last.
        times: (K + 1,) float32 times of the student's grid, every one a time of the teacher's.
        images: (M,) index of the image each token belongs to (for splitting by image).
        teacher_at_steps: (M, D) float32 token the teacher draws with its guidance and sampler in K
            steps (on its own K-step grid) from the same noise and conditions.
        guidance: how the teacher combined its branches.
        teacher_steps: intervals of the teacher's grid.
        teacher_sampler: the teacher sampler (deterministic).
    """

    conditions: torch.Tensor
    states: torch.Tensor
    times: torch.Tensor
    images: torch.Tensor
    teacher_at_steps: torch.Tensor
    guidance: Guidance
    teacher_steps: int
    teacher_sampler: Sampler

    @property
    def num_tokens(self) -> int:
        """M."""
        return self.states.shape[0]

    @property
    def student_steps(self) -> int:
        """K."""
        return self.times.shape[0] - 1

    def save(self, path: str | os.PathLike) -> None:
        """Write these trajectories to one safetensors file at ``path``, atomically: the tensors, and in
        its metadata the guidance, the teacher's steps and its sampler's spec (see `load`).

        Raises:
            ValueError: a guidance other than none or constant classifier-free guidance, or a sampler
                that is not registered, naming it (they could not be rebuilt).
        """
        from safetensors.torch import save_file

        from nextstep.io import atomic_path

        tensors = {name: getattr(self, name).contiguous() for name in _SAVED_TENSORS}
        metadata = {"format": TRAJECTORIES_FORMAT, "teacher_steps": str(self.teacher_steps),
                    "guidance": json.dumps(_guidance_to_dict(self.guidance)),
                    "teacher_sampler": json.dumps(ComponentSpec.of("sampler", self.teacher_sampler).to_dict())}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TeacherTrajectories":
        """Trajectories written by `save`.

        Raises:
            FileNotFoundError: no file at ``path``.
            ValueError: a file that is not a recording, or whose tensors disagree, naming what was
                expected and what was found.
        """
        from safetensors import SafetensorError, safe_open

        from nextstep.builders import build_component

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"expected a teacher recording (a .safetensors file), found nothing at {path}")
        try:
            opened = safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{path} is not a teacher recording: expected a safetensors file, found one that "
                             f"cannot be read ({error})") from None
        with opened as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != TRAJECTORIES_FORMAT:
                raise ValueError(f"{path} is not a teacher recording: expected format {TRAJECTORIES_FORMAT!r} in its "
                                 f"metadata, found {metadata.get('format')!r}")
            missing = sorted(set(_SAVED_TENSORS) - set(handle.keys()))
            if missing:
                raise ValueError(f"{path} lacks the tensors {missing} (expected {list(_SAVED_TENSORS)})")
            tensors = {name: handle.get_tensor(name) for name in _SAVED_TENSORS}
        trajectories = cls(**tensors, guidance=guidance_for_scale(float(json.loads(metadata["guidance"])["scale"])),
                           teacher_steps=int(metadata["teacher_steps"]),
                           teacher_sampler=build_component(ComponentSpec.from_dict(
                               json.loads(metadata["teacher_sampler"]))))
        trajectories.check(str(path))
        return trajectories

    def check(self, source: str = "the trajectories") -> None:
        """Raise ``ValueError`` naming ``source`` unless every tensor has the shape the others imply."""
        tokens, steps = self.states.shape[0], self.times.shape[0] - 1
        expected = {"conditions": (tokens, None), "states": (tokens, steps + 1, None), "times": (steps + 1,),
                    "images": (tokens,), "teacher_at_steps": (tokens, self.states.shape[-1])}
        for name, shape in expected.items():
            found = tuple(getattr(self, name).shape)
            if len(found) != len(shape) or any(want is not None and want != got for want, got in zip(shape, found)):
                raise ValueError(f"{source}: {name} should have shape "
                                 f"{tuple('*' if want is None else want for want in shape)}, found {found}")

    def select(self, rows: torch.Tensor) -> "TeacherTrajectories":
        """These trajectories restricted to the tokens ``rows`` (a (M,) bool mask or indices)."""
        return TeacherTrajectories(self.conditions[rows], self.states[rows], self.times, self.images[rows],
                                   self.teacher_at_steps[rows], self.guidance, self.teacher_steps,
                                   self.teacher_sampler)


TRAJECTORIES_FORMAT = "nextstep-teacher-trajectories-1"
"""The ``format`` entry of a saved recording's metadata."""

_SAVED_TENSORS = ("conditions", "states", "times", "images", "teacher_at_steps")


def _guidance_to_dict(guidance: Guidance) -> dict:
    if isinstance(guidance, NoGuidance):
        return {"scale": 1.0}
    if (type(guidance) is ClassifierFreeGuidance and guidance.schedule == "constant"
            and guidance.interval == (0.0, 1.0) and guidance.renorm is None):
        return {"scale": guidance.scale}
    raise ValueError(f"a saved recording holds no guidance or constant classifier-free guidance, found {guidance!r}")


def segment_boundaries(teacher_grid: torch.Tensor, student_grid: torch.Tensor) -> list[int]:
    """Index in ``teacher_grid`` (S + 1,) of every time of ``student_grid`` (K + 1,).

    Raises:
        ValueError: naming both grids, when a student time is not a time of the teacher's grid
            (as when K does not divide S).
    """
    check_time_grid(teacher_grid)
    check_time_grid(student_grid)
    teacher, student = teacher_grid.double().cpu(), student_grid.double().cpu()
    indices = []
    for time in student.tolist():
        matches = torch.nonzero(torch.isclose(teacher, torch.tensor(time, dtype=torch.float64), rtol=0,
                                              atol=1e-6)).flatten()
        if matches.numel() == 0:
            raise ValueError(f"every time of the student's grid must be a time of the teacher's grid; "
                             f"{time:.6g} is not (teacher grid {[round(v, 4) for v in teacher.tolist()]}, "
                             f"student grid {[round(v, 4) for v in student.tolist()]})")
        indices.append(int(matches[0]))
    if indices[0] != 0 or indices[-1] != teacher.shape[0] - 1:
        raise ValueError(f"the student's grid must start and end where the teacher's does, found times "
                         f"{student[0].item():.6g}..{student[-1].item():.6g} against "
                         f"{teacher[0].item():.6g}..{teacher[-1].item():.6g}")
    return indices


class SegmentRecorder(Sampler):
    """Runs a deterministic teacher sampler segment by segment and keeps what each token went through.

    Each segment of the teacher's grid (between two boundaries) is integrated by
    ``teacher.sample`` on that part of the grid; for one-step solvers (Euler,
    Heun, midpoint) that is exactly the teacher's own run, and a multistep
    solver restarts at every boundary. From the same noise it also runs the
    teacher on its own K-step grid (K the number of segments), for comparison.
    What it keeps goes to the CPU as it comes.

    Args:
        teacher: the sampler to record (``stochastic`` False).
        boundaries: indices of the teacher grid that end the segments (see `segment_boundaries`),
            0 first and S last.
        condition_dtype: the dtype the prompt branch's conditions are kept in.
    """

    def __init__(self, teacher: Sampler, boundaries: Sequence[int], condition_dtype: torch.dtype = torch.float32):
        super().__init__(None)
        if teacher.stochastic:
            raise ValueError(f"a head is distilled from a deterministic teacher sampler, found the stochastic "
                             f"{type(teacher).__name__}")
        self.teacher = teacher
        self.boundaries = list(boundaries)
        self.order = teacher.order
        self.evaluations_per_step = teacher.evaluations_per_step
        self.condition_dtype = condition_dtype
        self.conditions: list[torch.Tensor] = []
        self.states: list[torch.Tensor] = []
        self.teacher_at_steps: list[torch.Tensor] = []

    def make_time_grid(self, num_steps: int, shift: float = 1.0, *, device=None,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.teacher.make_time_grid(num_steps, shift, device=device, dtype=dtype)

    def sample(self, velocity_fn: VelocityFn, noise: torch.Tensor, time_grid: torch.Tensor,
               step_noise: torch.Tensor | None = None) -> torch.Tensor:
        """noise (N, D), time_grid (S + 1,) -> the teacher's samples (N, D); records the prompt branch's
        conditions of ``velocity_fn`` (a `nextstep.samplers.guidance.GuidedVelocity`), the states at the
        boundaries and the teacher's K-step samples."""
        if not isinstance(velocity_fn, GuidedVelocity):
            raise ValueError(f"recording needs the GuidedVelocity that generation passes, found "
                             f"{type(velocity_fn).__name__}")
        if self.boundaries[-1] != time_grid.shape[0] - 1:
            raise ValueError(f"the recorder's boundaries end at index {self.boundaries[-1]}, found a grid of "
                             f"{time_grid.shape[0]} times")
        states, x = [noise.float()], noise
        for start, end in zip(self.boundaries[:-1], self.boundaries[1:]):
            x = self.teacher.sample(velocity_fn, x, time_grid[start:end + 1])
            states.append(x.float())
        coarse_grid = self.teacher.make_time_grid(len(self.boundaries) - 1, device=noise.device, dtype=time_grid.dtype)
        coarse = self.teacher.sample(velocity_fn, noise, coarse_grid)
        self.conditions.append(velocity_fn.conditions[0].to("cpu", self.condition_dtype))
        self.states.append(torch.stack(states, dim=1).cpu())
        self.teacher_at_steps.append(coarse.float().cpu())
        return x


def record_teacher_trajectories(
    model: "NextStep",
    prompts: Sequence[str],
    *,
    student_steps: int,
    teacher_steps: int,
    guidance: Guidance,
    height: int | None = None,
    width: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    condition_dtype: torch.dtype = torch.float32,
    progress: Callable[[int, int], None] | None = None,
) -> TeacherTrajectories:
    """Generate one image per prompt with the model's own sampler and record every token.

    Image ``i`` is seeded ``seed + i`` whatever the batch size, as in
    `nextstep.evaluation.sampling.generate_images`; the grid is the text-to-image
    one (shift 1).

    Args:
        model: the teacher.
        prompts: one prompt per image (repeat a prompt for several images).
        student_steps: K, the segments of the teacher's grid recorded.
        teacher_steps: S, the teacher's steps per token (K must divide it on the sampler's grid).
        guidance: the teacher's guidance (1 or 2 branches).
        height: image height in pixels (default: the model's).
        width: image width in pixels (default: the model's).
        seed: seed of image 0.
        batch_size: images generated together.
        condition_dtype: the dtype the conditions are kept in (bfloat16 halves the memory of the
            largest part for wide backbones).
        progress: called with (images done, images in all) after each batch.
    """
    from nextstep.generation import check_prompts, generate_tokens

    prompts = check_prompts(prompts)
    teacher = model.sampler
    times = EulerSampler().make_time_grid(student_steps)
    boundaries = segment_boundaries(teacher.make_time_grid(teacher_steps), times)
    recorder = SegmentRecorder(teacher, boundaries, condition_dtype)
    images: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            _, grid_h, grid_w = generate_tokens(model, batch, height=height, width=width, cfg=guidance,
                                                num_steps=teacher_steps, shift=1.0, seed=seed + start,
                                                sampler=recorder, candidates=1)
            rows = torch.arange(start, start + len(batch))
            images.extend([rows] * (grid_h * grid_w))  # token by token, each holding the batch's images
            if progress is not None:
                progress(start + len(batch), len(prompts))
    finally:
        model.train(was_training)
    return TeacherTrajectories(
        conditions=torch.cat(recorder.conditions),
        states=torch.cat(recorder.states),
        times=times,
        images=torch.cat(images),
        teacher_at_steps=torch.cat(recorder.teacher_at_steps),
        guidance=guidance,
        teacher_steps=teacher_steps,
        teacher_sampler=teacher,
    )
