"""Few-step heads distilled from a model's own sampling: the recorded teacher, the student's
targets and training, the installed model, the prompt sets and the command."""

import dataclasses
import json
import re

import pytest
import torch

from nextstep.dtypes import DTYPES
from nextstep.generation import generate_tokens
from nextstep.samplers.euler import EulerSampler
from nextstep.samplers.guidance import ClassifierFreeGuidance, GuidedVelocity, NoGuidance, guidance_for_scale
from nextstep.samplers.time_grid import time_grid
from nextstep.training.head_distillation import (
    DISTILLATION_OBJECTIVES,
    HeadDistillation,
    HeadDistillationConfig,
    _split_by_image,
    _student_velocity_targets,
    distill_head,
    fit_distilled_head,
    install_distilled_head,
    resolve_teacher_guidance,
    rollout_loss,
    sampled_rmse,
    segment_loss,
    train_student,
)
from nextstep.training.teacher_trajectories import (
    TRAJECTORIES_FORMAT,
    SegmentRecorder,
    TeacherTrajectories,
    record_teacher_trajectories,
    segment_boundaries,
)

SIZE = dict(height=32, width=32)  # 2x2 tokens for the tiny preset
PROMPTS = ["a red circle", "a blue square", "two green triangles"]


def _record(model, prompts=PROMPTS, student_steps=2, teacher_steps=6, cfg=3.0, seed=0, batch_size=2, **options):
    return record_teacher_trajectories(model, prompts, student_steps=student_steps, teacher_steps=teacher_steps,
                                       guidance=guidance_for_scale(cfg), seed=seed, batch_size=batch_size,
                                       **SIZE, **options)


def test_segment_boundaries_find_the_students_times_on_the_teachers_grid():
    assert segment_boundaries(time_grid(20), time_grid(4)) == [0, 5, 10, 15, 20]
    assert segment_boundaries(time_grid(12, 3.0), time_grid(3, 3.0)) == [0, 4, 8, 12]
    assert segment_boundaries(time_grid(5), time_grid(5)) == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match=r"student's grid must be a time of the teacher's grid; 0\.333333 is not"):
        segment_boundaries(time_grid(20), time_grid(3))
    with pytest.raises(ValueError, match="must start and end where the teacher's does"):
        segment_boundaries(time_grid(4), torch.tensor([0.0, 0.5]))


def test_the_recorder_samples_exactly_what_the_teacher_samples_and_keeps_its_states(trained_like_model):
    """Recording changes no token; the recorded states are the noise, the teacher's state after each
    segment and its token; the conditions are the prompt branch's; tokens are listed token by token."""
    model = trained_like_model.eval()
    plain, _, _ = generate_tokens(model, PROMPTS, cfg=3.0, num_steps=6, seed=5, **SIZE)  # (3, 4, D)
    recorded = _record(model, seed=5, batch_size=3)
    assert recorded.num_tokens == 12 and recorded.student_steps == 2
    assert recorded.conditions.shape == (12, model.image_head.condition_dim)
    assert recorded.conditions.dtype == torch.float32 and recorded.conditions.device.type == "cpu"
    assert recorded.images.tolist() == [0, 1, 2] * 4
    tokens = recorded.states[:, -1].reshape(4, 3, -1).transpose(0, 1)  # token-major -> (images, tokens, D)
    torch.testing.assert_close(tokens, plain, rtol=0, atol=0)
    # the teacher in 2 steps: each image's first token is what 2-step generation draws first
    # (later tokens differ: generation's later conditions follow its own earlier tokens)
    coarse, _, _ = generate_tokens(model, PROMPTS, cfg=3.0, num_steps=2, seed=5, **SIZE)
    torch.testing.assert_close(recorded.teacher_at_steps[:3], coarse[:, 0], rtol=1e-6, atol=1e-6)
    assert (recorded.teacher_at_steps - recorded.states[:, -1]).abs().max() > 1e-3
    # each image's first condition reads the prompt alone: the prompt branch's is the unguided one
    unguided = _record(model, seed=5, batch_size=3, cfg=1.0)
    torch.testing.assert_close(recorded.conditions[:3], unguided.conditions[:3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(recorded.times, time_grid(2))
    # batches of another size record the same tokens
    other = _record(model, seed=5, batch_size=2)
    assert other.images.tolist() == [0, 1] * 4 + [2] * 4
    order = [0, 1, 3, 4, 6, 7, 9, 10]  # first batch: images 0 and 1, token by token
    torch.testing.assert_close(other.states[:8], recorded.states[order], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(other.states[8:], recorded.states[[2, 5, 8, 11]], rtol=1e-5, atol=1e-5)  # image 2
    model.train()
    _record(model, prompts=PROMPTS[:1])
    assert model.training  # left in the mode it came in


def test_the_recorded_states_and_coarse_teacher_follow_the_prompt_branchs_conditions(trained_like_model):
    """Without guidance the prompt branch is the teacher's only one: the middle state is three of its
    six Euler steps, the coarse teacher two, from the same noise on the recorded conditions."""
    model = trained_like_model.eval()
    recorded = _record(model, cfg=1.0, seed=2)
    velocity = GuidedVelocity(model.image_head, recorded.conditions[None], NoGuidance())
    middle = EulerSampler().sample(velocity, recorded.states[:, 0], time_grid(6)[:4])
    torch.testing.assert_close(recorded.states[:, 1], middle, rtol=1e-6, atol=1e-6)
    coarse = EulerSampler().sample(velocity, recorded.states[:, 0], time_grid(2))
    torch.testing.assert_close(recorded.teacher_at_steps, coarse, rtol=1e-6, atol=1e-6)
    narrow = _record(model, cfg=1.0, seed=2, condition_dtype=torch.bfloat16)
    assert narrow.conditions.dtype == torch.bfloat16
    torch.testing.assert_close(narrow.conditions, recorded.conditions.bfloat16(), rtol=0, atol=0)
    torch.testing.assert_close(narrow.states, recorded.states, rtol=0, atol=0)


def test_the_recorder_refuses_a_stochastic_teacher_and_an_unguided_velocity():
    from nextstep.samplers.euler_maruyama import EulerMaruyamaSampler

    with pytest.raises(ValueError, match="deterministic teacher sampler, found the stochastic EulerMaruyamaSampler"):
        SegmentRecorder(EulerMaruyamaSampler(), [0, 2])
    recorder = SegmentRecorder(EulerSampler(), [0, 1, 2])
    with pytest.raises(ValueError, match="needs the GuidedVelocity that generation passes, found function"):
        recorder.sample(lambda x, t: x, torch.zeros(1, 4), time_grid(2))
    with pytest.raises(ValueError, match="boundaries end at index 2, found a grid of 4 times"):
        recorder.sample(GuidedVelocity.__new__(GuidedVelocity), torch.zeros(1, 4), time_grid(3))


def _straight_trajectories(tokens=5, dim=3, times=(0.0, 0.1, 0.5, 1.0)):
    """Teacher states on straight paths x_t = x0 + t (x1 - x0): every segment's mean velocity is x1 - x0."""
    x0, x1 = torch.randn(tokens, dim), torch.randn(tokens, dim)
    times = torch.tensor(times)
    states = x0[:, None] + times[None, :, None] * (x1 - x0)[:, None]
    return TeacherTrajectories(torch.randn(tokens, dim), states, times, torch.arange(tokens), states[:, -1],
                               NoGuidance(), 6, EulerSampler())


def test_the_students_target_is_the_mean_velocity_of_each_segment():
    """Whatever the segment's width; the condition is the prompt branch's."""
    trajectories = _straight_trajectories()
    states, times = trajectories.states, trajectories.times
    tokens, segments = torch.tensor([0, 4, 2, 2]), torch.tensor([0, 1, 2, 1])
    x, t, condition, target = _student_velocity_targets(trajectories, tokens, segments)
    torch.testing.assert_close(x, states[tokens, segments])
    torch.testing.assert_close(t, times[segments])
    torch.testing.assert_close(condition, trajectories.conditions[tokens])
    torch.testing.assert_close(target, (states[:, -1] - states[:, 0])[tokens])


class _LinearVelocity(torch.nn.Module):
    """v(x, t, c) = a x + b c: a head whose Euler runs have a closed form."""

    def __init__(self, a: float, b: float):
        super().__init__()
        self.a, self.b = torch.nn.Parameter(torch.tensor(a)), torch.nn.Parameter(torch.tensor(b))

    def velocity(self, x, t, condition):
        assert t.shape == x.shape[:1]
        return self.a * x + self.b * condition


def test_the_rollout_loss_follows_the_students_own_steps_and_backpropagates_through_them():
    """With v = a x + b c, Euler's state after step k is known in closed form; the loss and its
    gradient (through every earlier step) must be that closed form's."""
    torch.manual_seed(0)
    trajectories = _straight_trajectories()
    tokens = torch.tensor([0, 3, 3, 4])
    head = _LinearVelocity(0.7, -0.4)
    loss = rollout_loss(head, trajectories, tokens)
    loss.backward()

    a, b = torch.tensor(0.7, requires_grad=True), torch.tensor(-0.4, requires_grad=True)
    states, condition, times = trajectories.states[tokens], trajectories.conditions[tokens], trajectories.times
    y, expected = states[:, 0], 0.0
    for k in range(3):
        width = times[k + 1] - times[k]
        y = y * (1 + a * width) + width * b * condition
        expected = expected + ((y - states[:, k + 1]) / width).pow(2).mean() / 3
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(head.a.grad, a.grad)
    torch.testing.assert_close(head.b.grad, b.grad)
    # the segment loss evaluates the head at the teacher's states instead: another number
    segments = segment_loss(head, trajectories, tokens.repeat_interleave(3), torch.arange(3).repeat(4))
    assert abs(segments.item() - loss.item()) > 1e-3


def test_with_one_step_the_two_objectives_are_one_and_fit_the_same_student(trained_like_model):
    trajectories = _record(trained_like_model.eval(), student_steps=1, teacher_steps=3)
    tokens = torch.tensor([0, 5, 7])
    head = trained_like_model.image_head
    torch.testing.assert_close(rollout_loss(head, trajectories, tokens),
                               segment_loss(head, trajectories, tokens, torch.zeros(3, dtype=torch.long)))
    config = HeadDistillationConfig(steps=1, teacher_steps=3, iterations=4, batch_size=6, learning_rate=1e-3)
    students = [train_student(head, trajectories, config.replace(objective=objective))[0]
                for objective in DISTILLATION_OBJECTIVES]
    for name, value in students[0].state_dict().items():
        torch.testing.assert_close(students[1].state_dict()[name], value, rtol=1e-4, atol=1e-6)


def test_a_rollout_step_draws_whole_tokens_for_the_same_head_evaluations(trained_like_model, monkeypatch):
    import nextstep.training.head_distillation as head_distillation

    trajectories = _record(trained_like_model.eval(), student_steps=2, teacher_steps=6)
    drawn = []
    real = head_distillation.rollout_loss
    monkeypatch.setattr(head_distillation, "rollout_loss",
                        lambda head, recorded, tokens: drawn.append(tokens) or real(head, recorded, tokens))
    config = HeadDistillationConfig(steps=2, teacher_steps=6, iterations=3, batch_size=7, objective="rollout")
    train_student(trained_like_model.image_head, trajectories, config)
    assert [tokens.shape for tokens in drawn] == [(3,)] * 3
    train_student(trained_like_model.image_head, trajectories, config.replace(batch_size=1))
    assert drawn[-1].shape == (1,)


@pytest.mark.parametrize("objective", DISTILLATION_OBJECTIVES)
def test_a_student_learns_to_follow_its_teacher_in_fewer_steps_without_guidance(trained_like_model, objective):
    model = trained_like_model.eval()
    before = {name: value.clone() for name, value in model.image_head.state_dict().items()}
    prompts = [f"{colour} {shape}" for colour in ("red", "green", "blue") for shape in ("circle", "square")]
    config = HeadDistillationConfig(steps=2, teacher_steps=8, cfg=3.0, images_per_prompt=4, iterations=300,
                                    batch_size=64, learning_rate=1e-3, validation_fraction=0.25, objective=objective)
    seen = []
    distilled = distill_head(model, prompts, config, progress=lambda *args: seen.append(args), **SIZE)
    report = distilled.report
    assert report["images"] == 24 and report["tokens"] == 96 and report["held_out_tokens"] == 24
    assert report["head_evaluations_per_token"] == {"teacher": 16, "student": 2}
    assert report["objective"] == objective and report["cfg"] == 3.0
    # the undistilled head at 2 steps without guidance is further from the teacher (0.054 here; the student 0.037)
    assert report["student_rmse"] < 0.8 * report["initial_rmse"]
    assert 0 < report["teacher_rmse_at_steps"] < report["token_rms"]
    assert report["losses"][-1] < report["losses"][0] and len(report["losses"]) == 10
    assert ("teacher", 24, 24) in seen and ("student", 300, 300) in seen
    for name, value in model.image_head.state_dict().items():  # the teacher is left as it was
        assert torch.equal(value, before[name]), name
    assert not distilled.head.training and not any(p.requires_grad for p in distilled.head.parameters())


def test_an_installed_student_samples_with_its_own_grid_and_no_guidance(tmp_path, trained_like_model):
    from nextstep import load_model
    from nextstep.config import ComponentSpec
    from nextstep.samplers.heun import HeunSampler

    model = trained_like_model.eval()
    model.sampler = HeunSampler()  # the teacher's sampler is not the student's
    model.config = model.config.replace(sampler=ComponentSpec.named("sampler", "heun"),
                                        generation=model.config.generation.replace(candidates=4))
    student = type(model.image_head)(model.image_head.config)
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.normal_(std=0.05)
    install_distilled_head(model, HeadDistillation(student.eval(), 3))
    generation = model.config.generation
    assert (generation.cfg, generation.cfg_schedule, generation.num_steps, generation.candidates) == \
           (1.0, "constant", 3, 1)
    assert model.config.sampler.type == "euler" and isinstance(model.sampler, EulerSampler)
    model.save_pretrained(tmp_path / "student")
    loaded = load_model(str(tmp_path / "student")).eval()
    assert loaded.config.generation == model.config.generation and loaded.config.sampler.type == "euler"
    tokens, _, _ = generate_tokens(loaded, ["a red circle"], seed=3, **SIZE)
    # by hand: one branch, the student's three Euler steps
    by_hand, _, _ = generate_tokens(loaded, ["a red circle"], seed=3, cfg=1.0, num_steps=3, sampler="euler", **SIZE)
    torch.testing.assert_close(tokens, by_hand, rtol=0, atol=0)
    for name, value in student.state_dict().items():
        torch.testing.assert_close(loaded.image_head.state_dict()[name], value)
    # The saved model knows what its head was fitted for, and says so when sampled otherwise.
    assert loaded.config.distilled_head == {"steps": 3}
    for asked, named in ((dict(cfg=3.0), "guidance 3.0"), (dict(num_steps=20), "20 steps (fitted for 3)"),
                         (dict(sampler="heun"), "sampler HeunSampler"), (dict(shift=2.0), "shift 2.0"),
                         (dict(candidates=2), "2 candidates")):
        with pytest.warns(UserWarning, match=rf"distilled to sample 3 Euler steps without guidance; sampling it "
                                             rf"with {re.escape(named)}"):
            generate_tokens(loaded, ["a red circle"], seed=3, **SIZE, **asked)


def test_an_installed_head_must_be_of_the_models_kind(tiny_model):
    with pytest.raises(ValueError, match="the distilled head is a Linear, the model's a FlowMatchingHead"):
        install_distilled_head(tiny_model, HeadDistillation(torch.nn.Linear(2, 2), 2))


def test_the_teacher_guidance_is_the_models_constant_scale_or_the_one_asked(tiny_model):
    assert repr(resolve_teacher_guidance(tiny_model, None)) == repr(ClassifierFreeGuidance(7.5))
    assert isinstance(resolve_teacher_guidance(tiny_model, 1.0), NoGuidance)
    tiny_model.config = tiny_model.config.replace(
        generation=tiny_model.config.generation.replace(cfg_schedule="linear_increasing"))
    with pytest.raises(ValueError, match="the model's cfg_schedule is 'linear_increasing'"):
        resolve_teacher_guidance(tiny_model, 2.0)


@pytest.mark.parametrize("changes, message", [
    ({"steps": 3}, r"teacher_steps must be a multiple of steps \(3\), so that every student time is a teacher "
                   r"time, found 20"),
    ({"cfg": -1.0}, "cfg must be None or a finite number >= 0, found -1.0"),
    ({"cfg": float("inf")}, "HeadDistillationConfig.cfg must be a finite number or null, found float inf"),
    ({"learning_rate": 0.0}, "learning_rate must be a positive number, found 0.0"),
    ({"validation_fraction": 1.0}, r"validation_fraction must be in \[0, 1\), found 1.0"),
    ({"iterations": 0}, "iterations must be an integer >= 1, found 0"),
    ({"seed": -1}, "seed must be >= 0, found -1"),
    ({"condition_dtype": "float64"}, r"condition_dtype must be one of \['float32', 'bfloat16', 'float16'\], "
                                     "found 'float64'"),
    ({"objective": "trajectories"}, r"objective must be one of \['segments', 'rollout'\], found 'trajectories'"),
])
def test_the_config_refuses_what_cannot_be_distilled(changes, message):
    with pytest.raises(ValueError, match=message):
        HeadDistillationConfig(**changes)


def test_fitting_a_recording_is_what_distill_head_does_and_the_recording_must_match(trained_like_model):
    model = trained_like_model.eval()
    config = HeadDistillationConfig(steps=2, teacher_steps=6, cfg=3.0, iterations=5, batch_size=8, seed=2,
                                    objective="rollout")
    distilled = distill_head(model, PROMPTS, config, **SIZE)
    trajectories = _record(model, seed=2, batch_size=config.generation_batch_size)
    fitted = fit_distilled_head(model, trajectories, config)
    for name, value in distilled.head.state_dict().items():
        assert torch.equal(fitted.head.state_dict()[name], value), name
    seconds = distilled.report.pop("seconds"), fitted.report.pop("seconds")
    assert fitted.report == distilled.report and fitted.steps == 2
    assert set(seconds[0]) == {"teacher", "student"} and set(seconds[1]) == {"student"}
    _, held_out = _split_by_image(trajectories, config.validation_fraction, config.seed)
    coarse_error = (held_out.teacher_at_steps - held_out.states[:, -1]).pow(2).mean().sqrt().item()
    assert fitted.report["teacher_rmse_at_steps"] == pytest.approx(coarse_error) and coarse_error > 0
    with pytest.raises(ValueError, match="the config asks for 1 student steps from 2 teacher steps, the trajectories "
                                         "were recorded for 2 from 6"):
        fit_distilled_head(model, trajectories, config.replace(steps=1, teacher_steps=2))
    narrow = dataclasses.replace(trajectories, conditions=trajectories.conditions[:, :5])
    with pytest.raises(ValueError, match=rf"another model: expected conditions of width "
                                         rf"{model.image_head.condition_dim} and tokens of width 64 \(this model's "
                                         rf"head\), found 5 and 64"):
        fit_distilled_head(model, narrow, config)


def test_the_split_keeps_whole_images_on_one_side(trained_like_model):
    trajectories = _record(trained_like_model.eval(), prompts=PROMPTS * 2)
    training, held_out = _split_by_image(trajectories, 0.3, seed=1)
    assert held_out.images.unique().numel() == 2 and training.images.unique().numel() == 4
    assert not set(training.images.tolist()) & set(held_out.images.tolist())
    assert training.num_tokens + held_out.num_tokens == trajectories.num_tokens == 24
    training, held_out = _split_by_image(trajectories, 0.0, seed=1)
    assert held_out.num_tokens == 0 and training.num_tokens == 24
    with pytest.raises(ValueError, match="validation_fraction 0.95 holds out 6 of the 6 recorded images, leaving none"):
        _split_by_image(trajectories, 0.95, seed=1)


def test_without_held_out_images_the_report_has_no_errors(trained_like_model):
    config = HeadDistillationConfig(steps=1, teacher_steps=2, iterations=3, batch_size=4, validation_fraction=0.0)
    report = distill_head(trained_like_model.eval(), ["a circle"], config, **SIZE).report
    assert report["held_out_tokens"] == 0 and "student_rmse" not in report and "token_rms" not in report


def test_the_report_counts_every_evaluation_of_the_teachers_sampler_and_branches(trained_like_model):
    from nextstep.samplers.heun import HeunSampler

    model = trained_like_model.eval()
    model.sampler = HeunSampler()
    config = HeadDistillationConfig(steps=2, teacher_steps=6, cfg=1.0, iterations=1, batch_size=4)
    report = distill_head(model, ["a circle", "a square"], config, **SIZE).report
    assert report["head_evaluations_per_token"] == {"teacher": 12, "student": 2}
    assert report["teacher_sampler"] == "HeunSampler" and report["cfg"] == 1.0
    config = config.replace(cfg=2.0)
    assert distill_head(model, ["a circle"], config, **SIZE).report["head_evaluations_per_token"]["teacher"] == 24


def test_a_diverging_student_stops_with_what_to_change(trained_like_model):
    trajectories = _record(trained_like_model.eval())
    trajectories.states[0, 1] = float("nan")
    config = HeadDistillationConfig(steps=2, teacher_steps=6, iterations=50, batch_size=12, learning_rate=1e-3)
    with pytest.raises(FloatingPointError, match=r"the student's loss is nan at iteration \d+; lower learning_rate"):
        train_student(trained_like_model.image_head, trajectories, config)
    empty = trajectories.select(torch.zeros(trajectories.num_tokens, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least one recorded token, found none"):
        train_student(trained_like_model.image_head, empty, config)


def test_the_sampled_error_is_zero_for_the_teacher_itself_and_counts_every_token(trained_like_model):
    model = trained_like_model.eval()
    trajectories = _record(model, student_steps=3, teacher_steps=3, cfg=1.0)
    assert sampled_rmse(model.image_head, trajectories, EulerSampler(), time_grid(3), batch=5) < 1e-6
    torch.testing.assert_close(trajectories.teacher_at_steps, trajectories.states[:, -1])  # K = S: itself
    shifted = trajectories.select(torch.arange(trajectories.num_tokens))
    shifted.states = shifted.states.clone()
    shifted.states[:, -1] += 0.5  # every teacher token moved by 0.5 in every feature
    error = sampled_rmse(model.image_head, shifted, EulerSampler(), time_grid(3), batch=5)
    assert error == pytest.approx(0.5, abs=1e-5)


def test_prompt_sets_hold_training_prompts_and_files(tmp_path):
    from nextstep.evaluation.shapes_geneval import geneval_prompts
    from nextstep.training.prompt_sets import prompt_set

    seen = prompt_set("shapes-seen")
    held_out = {entry["prompt"] for entry in geneval_prompts("held_out") if entry["tag"] != "single_object"}
    assert len(seen) == len(set(seen)) > 100 and not set(seen) & held_out
    (tmp_path / "p.txt").write_text("a red circle\n\n  a blue square \n")
    assert prompt_set(str(tmp_path / "p.txt")) == ["a red circle", "a blue square"]
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "a cat", "tag": "x"}) + "\n")
    assert prompt_set(str(tmp_path / "p.jsonl")) == ["a cat"]
    with pytest.raises(FileNotFoundError, match=r"a prompt file or one of the prompt sets \['emoji-train', "
                                                r"'shapes-seen'\], found 'shapes'"):
        prompt_set("shapes")


def test_the_command_writes_a_student_model_and_its_report(tmp_path, trained_like_model, capsys):
    from nextstep import load_model
    from nextstep.cli import main

    trained_like_model.config = trained_like_model.config.replace(
        generation=trained_like_model.config.generation.replace(height=32, width=32))
    trained_like_model.save_pretrained(tmp_path / "teacher")
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    assert main(["distill-head", str(tmp_path / "teacher"), str(tmp_path / "student"), "--prompts",
                 str(tmp_path / "prompts.txt"), "--steps", "2", "--teacher-steps", "4", "--iterations", "5",
                 "--batch-size", "8", "--images-per-prompt", "5", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "2 Euler steps, no guidance branch (2 head evaluations per token, the teacher 8)" in out
    report = json.loads((tmp_path / "student" / "distillation.json").read_text())
    assert report["images"] == 10 and report["iterations"] == 5 and report["teacher_steps"] == 4
    student = load_model(str(tmp_path / "student"))
    assert (student.config.generation.cfg, student.config.generation.num_steps) == (1.0, 2)


def test_the_command_keeps_a_recording_and_fits_other_students_to_it(tmp_path, trained_like_model, capsys):
    from nextstep import load_model
    from nextstep.cli import main

    trained_like_model.config = trained_like_model.config.replace(
        generation=trained_like_model.config.generation.replace(height=32, width=32))
    trained_like_model.save_pretrained(tmp_path / "teacher")
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    teacher, recording = str(tmp_path / "teacher"), str(tmp_path / "recording.safetensors")
    fit = ["--iterations", "5", "--batch-size", "8", "--quiet"]
    assert main(["distill-head", teacher, str(tmp_path / "drawn"), "--prompts", str(tmp_path / "prompts.txt"),
                 "--steps", "2", "--teacher-steps", "4", "--images-per-prompt", "3", "--save-recording", recording,
                 *fit]) == 0
    assert f"wrote {recording}: 24 recorded tokens" in capsys.readouterr().out
    # the same student again from the file, with its steps; then another objective
    assert main(["distill-head", teacher, str(tmp_path / "again"), "--recording", recording, *fit]) == 0
    drawn, again = (load_model(str(tmp_path / name)).image_head.state_dict() for name in ("drawn", "again"))
    for name, value in drawn.items():
        assert torch.equal(again[name], value), name
    assert main(["distill-head", teacher, str(tmp_path / "rollout"), "--recording", recording, "--objective",
                 "rollout", *fit]) == 0
    report = json.loads((tmp_path / "rollout" / "distillation.json").read_text())
    assert (report["objective"], report["steps"], report["teacher_steps"], report["images"]) == ("rollout", 2, 4, 6)
    capsys.readouterr()
    assert main(["distill-head", teacher, str(tmp_path / "no"), "--recording", recording, "--cfg", "2", *fit]) == 2
    assert ("--recording takes the teacher's images from" in capsys.readouterr().err
            and not (tmp_path / "no").exists())
    assert main(["distill-head", teacher, str(tmp_path / "no"), "--recording", recording, "--steps", "1", *fit]) == 2
    assert "the config asks for 1 student steps from 4 teacher steps, the trajectories were recorded for 2 from 4" \
        in capsys.readouterr().err


def test_a_saved_recording_loads_as_it_was_and_a_bad_file_is_named(tmp_path, trained_like_model, monkeypatch):
    import safetensors.torch

    from nextstep.samplers.heun import HeunSampler, HeunSamplerConfig

    model = trained_like_model.eval()
    model.sampler = HeunSampler(HeunSamplerConfig())
    recorded = _record(model, cfg=3.0, condition_dtype=torch.bfloat16)
    path = tmp_path / "recording.safetensors"
    recorded.save(path)
    loaded = TeacherTrajectories.load(path)
    for name in ("conditions", "states", "times", "images", "teacher_at_steps"):
        assert getattr(loaded, name).dtype == getattr(recorded, name).dtype
        assert torch.equal(getattr(loaded, name), getattr(recorded, name)), name
    assert repr(loaded.guidance) == repr(recorded.guidance) and loaded.teacher_steps == 6
    assert type(loaded.teacher_sampler) is HeunSampler and loaded.teacher_sampler.config == HeunSamplerConfig()

    before = path.read_bytes()
    with pytest.raises(ValueError, match="no guidance or constant classifier-free guidance, found "
                                         r"ClassifierFreeGuidance\(3.0, schedule='constant', interval=\(0.0, 1.0\), "
                                         r"renorm=2.0\)"):
        TeacherTrajectories(**{**vars(recorded), "guidance": ClassifierFreeGuidance(3.0, renorm=2.0)}).save(path)

    class Unregistered(HeunSampler):
        pass

    with pytest.raises(ValueError, match="Unregistered is not registered"):
        TeacherTrajectories(**{**vars(recorded), "teacher_sampler": Unregistered()}).save(path)
    monkeypatch.setattr(safetensors.torch, "save_file", lambda *args, **kwargs: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        recorded.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [path.name]  # left as it was

    with pytest.raises(FileNotFoundError, match="expected a teacher recording"):
        TeacherTrajectories.load(tmp_path / "missing.safetensors")
    (tmp_path / "truncated.safetensors").write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated.safetensors is not a teacher recording: expected a safetensors "
                                         "file, found one that cannot be read"):
        TeacherTrajectories.load(tmp_path / "truncated.safetensors")
    safetensors.torch.save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="is not a teacher recording: expected format "
                                         "'nextstep-teacher-trajectories-1' in its metadata, found None"):
        TeacherTrajectories.load(tmp_path / "other.safetensors")
    broken = TeacherTrajectories(**{**vars(recorded), "teacher_at_steps": recorded.teacher_at_steps[:5]})
    broken.save(tmp_path / "broken.safetensors")
    with pytest.raises(ValueError, match=r"broken.safetensors: teacher_at_steps should have shape \(12, 64\), "
                                         r"found \(5, 64\)"):
        TeacherTrajectories.load(tmp_path / "broken.safetensors")
    safetensors.torch.save_file({"states": recorded.states, "times": recorded.times},
                                str(tmp_path / "partial.safetensors"), metadata={"format": TRAJECTORIES_FORMAT})
    with pytest.raises(ValueError, match=r"partial.safetensors lacks the tensors \['conditions', 'images', "
                                         r"'teacher_at_steps'\]"):
        TeacherTrajectories.load(tmp_path / "partial.safetensors")


def test_the_command_takes_the_configs_defaults_and_names_a_bad_prompt_source(tmp_path, monkeypatch, capsys):
    import nextstep.training.head_distillation as head_distillation
    from nextstep.cli import main

    asked = {}

    def stop(model, prompts, config, progress=None):
        asked.update(config=config, prompts=prompts)
        raise ValueError("stopped")

    monkeypatch.setattr(head_distillation, "record_for_distillation", stop)
    (tmp_path / "p.txt").write_text("a circle\n")
    assert main(["distill-head", "tiny", str(tmp_path / "out"), "--prompts", str(tmp_path / "p.txt"),
                 "--quiet"]) == 2
    assert asked["config"] == HeadDistillationConfig() and asked["prompts"] == ["a circle"]
    assert main(["distill-head", "tiny", str(tmp_path / "out"), "--prompts", str(tmp_path / "p.txt"),
                 "--cfg", "2.5", "--seed", "3", "--learning-rate", "0.001", "--objective", "rollout",
                 "--condition-dtype", "bfloat16", "--quiet"]) == 2
    assert asked["config"] == HeadDistillationConfig(cfg=2.5, seed=3, learning_rate=0.001, objective="rollout",
                                                     condition_dtype="bfloat16")
    assert main(["distill-head", "tiny", str(tmp_path / "out"), "--prompts", "nothing-here", "--quiet"]) == 2
    assert "expected a prompt file or one of the prompt sets ['emoji-train', 'shapes-seen'], found 'nothing-here'" \
        in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    asked.clear()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("mine")
    assert main(["distill-head", "tiny", str(tmp_path / "notes"), "--prompts", str(tmp_path / "p.txt"),
                 "--quiet"]) == 2
    assert "found a folder of 1 other entries (notes.txt)" in capsys.readouterr().err
    assert not asked  # refused before the teacher drew anything


def test_the_commands_help_states_the_configs_defaults():
    import argparse

    from nextstep.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    helps = {action.dest: action.help for action in commands.choices["distill-head"]._actions}
    config = HeadDistillationConfig()
    for name in ("steps", "teacher_steps", "images_per_prompt", "condition_dtype", "objective", "iterations",
                 "batch_size", "learning_rate", "seed"):
        assert f"(default {getattr(config, name)})" in helps[name], name
    objective = next(action for action in commands.choices["distill-head"]._actions if action.dest == "objective")
    assert tuple(objective.choices) == DISTILLATION_OBJECTIVES
    condition_dtype = next(action for action in commands.choices["distill-head"]._actions
                           if action.dest == "condition_dtype")
    assert tuple(condition_dtype.choices) == tuple(DTYPES)
