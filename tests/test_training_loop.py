"""Loop options: gradient checkpointing, bf16 autocast, accumulation semantics, TensorBoard."""

import copy
import importlib.util

import numpy as np
import pytest
import torch
from training_helpers import shapes_data, tiny_config, tiny_trainer

from nextstep.training import TextToImageTask, Trainer
from nextstep.training.data.loader import mix_seed
from nextstep.training.trainer import autocast_context


def test_gradient_checkpointing_trains_the_same_model(tmp_path):
    plain = tiny_trainer(tmp_path / "plain", tiny_config(max_steps=2)).fit(resume=False)
    trainer = tiny_trainer(tmp_path / "ckpt", tiny_config(max_steps=2, gradient_checkpointing=True))
    assert trainer.task.model.backbone.config.gradient_checkpointing
    recomputed = trainer.fit(resume=False)
    assert [r.loss for r in plain] == pytest.approx([r.loss for r in recomputed], abs=1e-6)
    assert [r.grad_norm for r in plain] == pytest.approx([r.grad_norm for r in recomputed], abs=1e-6)


def test_bf16_autocast_runs_on_the_cpu_and_auto_means_fp32_there(tmp_path):
    records = tiny_trainer(tmp_path, tiny_config(max_steps=2, precision="bf16")).fit(resume=False)
    assert all(torch.isfinite(torch.tensor(r.loss)) for r in records)
    with autocast_context("auto", torch.device("cpu")):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_accumulation_steps_see_micro_batches_of_one_global_batch(tmp_path):
    trainer = tiny_trainer(tmp_path, tiny_config(max_steps=1, micro_batch_size=2, gradient_accumulation=3))
    record = trainer.fit(resume=False)[0]
    assert trainer.layout.global_batch_size == 6
    assert record.tokens > 0 and set(record.metrics) == {"text_loss", "image_loss"}


@pytest.mark.parametrize("averaging", ["step", "micro_batch"])
def test_accumulated_gradient_is_that_of_the_loss_averaging(tmp_path, averaging):
    """``step``: the gradient of the step's examples taken as one batch (each target counts once);
    ``micro_batch``: the mean of the micro-batches' own mean losses."""
    config = tiny_config(max_steps=1, micro_batch_size=2, gradient_accumulation=2, grad_clip=0.0,
                         loss_averaging=averaging)
    trainer = tiny_trainer(tmp_path, config)
    model = copy.deepcopy(trainer.model)
    task = TextToImageTask.from_train_config(model, config)
    batches = iter(trainer.data.open(trainer.layout, rank=0, seed=config.seed, start_step=0))
    outputs = []
    for index in range(config.gradient_accumulation):
        generator = torch.Generator().manual_seed(mix_seed(config.seed, "step", 0, trainer.layout.slot(index, 0)))
        outputs.append(model(task.prepare(next(batches), generator), generator=generator))
    text_counts = [output.num_text_tokens for output in outputs]
    assert text_counts[0] != text_counts[1]  # captions of other lengths: the two averagings differ
    if averaging == "step":
        text = sum(o.text * o.num_text_tokens for o in outputs) / sum(text_counts)
        image = sum(o.image * o.num_image_tokens for o in outputs) / sum(o.num_image_tokens for o in outputs)
        expected = model.config.text_loss_weight * text + model.config.image_loss_weight * image
    else:
        expected = sum(o.total for o in outputs) / len(outputs)
    expected.backward()
    record = trainer.fit(resume=False)[0]
    assert record.loss == pytest.approx(float(expected.detach()), rel=1e-6)
    if averaging == "step":
        assert record.metrics["text_loss"] == pytest.approx(float(text.detach()), rel=1e-5)
    for (name, trained), reference in zip(trainer.model.named_parameters(), model.parameters()):
        if reference.grad is not None:
            torch.testing.assert_close(trained.grad, reference.grad, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("averaging, order", [
    ("step", ["prepare", "prepare", "loss", "loss"]),  # the step's counts before the first forward pass
    ("micro_batch", ["prepare", "loss", "prepare", "loss"]),  # one micro-batch in memory at a time
])
def test_micro_batches_are_prepared_ahead_only_when_the_step_counts_them(tmp_path, averaging, order):
    calls = []

    class Recording(TextToImageTask):
        def prepare(self, batch, generator):
            calls.append("prepare")
            return super().prepare(batch, generator)

        def loss(self, module, batch, generator, totals=None):
            calls.append("loss")
            return super().loss(module, batch, generator, totals)

    config = tiny_config(max_steps=1, gradient_accumulation=2, loss_averaging=averaging)
    model = tiny_trainer(tmp_path / "model", config).model
    Trainer(Recording.from_train_config(model, config), shapes_data(), config, tmp_path / averaging,
            show_progress=False).fit(resume=False)
    assert calls == order


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_tensorboard_without_the_package_says_what_to_install(tmp_path):
    with pytest.raises(ImportError, match="pip install tensorboard"):
        tiny_trainer(tmp_path, tiny_config(max_steps=1, tensorboard=True)).fit(resume=False)


def test_compiled_training_matches_eager_and_falls_back_on_failure(tmp_path, monkeypatch):
    from nextstep.compile import CompileConfig, CompileFallbackWarning

    plain = tiny_trainer(tmp_path / "plain", tiny_config(max_steps=2)).fit(resume=False)
    # The eager backend traces with torch.compile but computes like eager: equal losses.
    config = tiny_config(max_steps=2, compile=CompileConfig(enabled=True, backend="eager"))
    trainer = tiny_trainer(tmp_path / "compiled", config)
    assert "forward" in vars(trainer.model)
    compiled = trainer.fit(resume=False)
    assert [r.loss for r in plain] == pytest.approx([r.loss for r in compiled], abs=1e-6)
    # A backend that cannot compile warns once and the run trains eagerly.
    broken = tiny_config(max_steps=2, compile=CompileConfig(enabled=True, backend="no-such-backend"))
    with pytest.warns(CompileFallbackWarning):
        fallen = tiny_trainer(tmp_path / "broken", broken).fit(resume=False)
    assert [r.loss for r in plain] == pytest.approx([r.loss for r in fallen], abs=1e-6)


def test_train_config_reads_compile_settings_from_a_recipe():
    from nextstep.compile import CompileConfig
    from nextstep.training.config import TrainConfig

    config = TrainConfig.from_dict({"compile": {"enabled": True, "mode": "max-autotune-no-cudagraphs"}})
    assert config.compile == CompileConfig(enabled=True, mode="max-autotune-no-cudagraphs")
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown key"):
        TrainConfig.from_dict({"compile": {"enable": True}})


def test_a_sample_size_the_tokenizer_cannot_draw_is_refused_before_training(tmp_path):
    config = tiny_config(sample_every=1, sample_height=40, sample_prompts=("a red circle",))
    with pytest.raises(ValueError, match=r"train\.sample_height and train\.sample_width: .*multiple of 16.*found 40"):
        tiny_trainer(tmp_path, config)
    assert not (tmp_path / "checkpoints").exists()
    with pytest.raises(ValueError, match=r"train.sample_prompts must be at least one prompt when sample_every > 0 "
                                         r"\(TextToImageTask draws its samples from them\), found \(\)"):
        tiny_trainer(tmp_path, tiny_config(sample_every=1))


class _Points:
    """y = 3x + 1 in micro-batches, forever."""

    size = None
    known_bad: list = []

    def open(self, layout, *, rank=0, seed=0, start_step=0, num_workers=0):
        generator = torch.Generator().manual_seed(seed)
        while True:
            x = torch.randn(layout.micro_batch_size, 1, generator=generator)
            yield x, 3 * x + 1


def test_a_metric_given_as_a_tensor_is_logged_as_a_number(tmp_path):
    from torch import nn

    from nextstep.training import StepResult, TrainConfig, TrainingTask
    from nextstep.training.logging import read_log

    class Fit(TrainingTask):
        def __init__(self, model, metric):
            super().__init__(model)
            self.metric = metric

        def loss(self, module, batch, generator):
            x, y = batch
            error = module(x) - y
            return StepResult(loss=error.pow(2).mean(), metrics={"mae": self.metric(error)}, num_tokens=len(x))

    config = TrainConfig(max_steps=2, micro_batch_size=4, warmup_steps=1, log_every=1, gradient_accumulation=2)
    records = Trainer(Fit(nn.Linear(1, 1), lambda error: error.abs().mean()), _Points(), config, tmp_path / "a",
                      show_progress=False).fit()
    numpy_records = Trainer(Fit(nn.Linear(1, 1), lambda error: np.float32(error.abs().mean().item())), _Points(),
                            config, tmp_path / "numpy", show_progress=False).fit()
    assert all(type(record.metrics["mae"]) is float for record in numpy_records)
    assert all(type(record.metrics["mae"]) is float for record in records)
    logged = [row["mae"] for row in read_log(tmp_path / "a" / "train_log.csv")]
    assert logged == pytest.approx([record.metrics["mae"] for record in records], rel=1e-6)
    with pytest.raises(ValueError, match=r"metric 'mae' must be a number or a one-element tensor, "
                                         r"found Tensor\(4, 1\)"):
        Trainer(Fit(nn.Linear(1, 1), lambda error: error.abs()), _Points(), config, tmp_path / "b",
                show_progress=False).fit()


def test_a_component_that_could_not_be_checkpointed_is_refused_before_training(tmp_path):
    from training_helpers import shapes_data

    from nextstep import build_model
    from nextstep.heads import FlowMatchingHead
    from nextstep.training import Trainer
    from nextstep.training.text_to_image import TextToImageTask

    class PlainHead(FlowMatchingHead):  # injected, not registered
        pass

    model = build_model("tiny", seed=0)
    model.image_head = PlainHead(model.image_head.config)
    config = tiny_config()
    with pytest.raises(ValueError, match="image_head PlainHead is not registered"):
        Trainer(TextToImageTask.from_train_config(model, config), shapes_data(), config, tmp_path, show_progress=False)
    assert not (tmp_path / "checkpoints").exists()


def test_every_fit_resumes_from_the_latest_checkpoint(tmp_path, monkeypatch):
    trainer = tiny_trainer(tmp_path, tiny_config(max_steps=1, checkpoint_every=1))
    calls = []
    real = trainer.resume
    monkeypatch.setattr(trainer, "resume", lambda *args: calls.append(1) or real(*args))
    trainer.fit()
    trainer.fit()  # after a failure, say: back to the checkpoint, not on from the weights in memory
    assert calls == [1, 1]


def test_the_trainer_averages_the_weights_after_each_optimiser_step(tmp_path):
    trainer = tiny_trainer(tmp_path, tiny_config(max_steps=1, ema_decay=0.5))
    start = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.fit(resume=False)
    for name, parameter in trainer.model.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(trainer.ema.shadow[name], 0.5 * start[name] + 0.5 * parameter.detach().float())


def test_gradient_clipping_bounds_the_step_it_takes(tmp_path):
    """Gradients clipped to a norm of 1e-12 are far below Adam's eps: the step barely moves a weight."""
    config = tiny_config(max_steps=1, warmup_steps=0, grad_clip=1e-12, weight_decay=0.0, learning_rate=1e-2)
    trainer = tiny_trainer(tmp_path, config)
    start = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.fit(resume=False)
    assert max((p.detach() - start[name]).abs().max().item() for name, p in trainer.model.named_parameters()) < 1e-4


def test_caption_dropout_puts_the_image_first_at_its_probability(monkeypatch):
    """An image-first sequence is the unconditional one (its caption follows the image): text_dropout 0
    makes none, 1 only those; the default is the model's image_first_probability (the release's 0.3)."""
    import dataclasses

    from nextstep import build_model
    from nextstep.model_config import ModelConfig
    from nextstep.sequence import SequenceBuilder
    from nextstep.training.data.loader import BatchLayout

    assert {f.name: f.default for f in dataclasses.fields(ModelConfig)}["image_first_probability"] == 0.3
    model = build_model("tiny", seed=0)
    assert TextToImageTask(model).text_dropout == model.config.image_first_probability
    batch = next(iter(shapes_data().open(BatchLayout(8), rank=0, seed=0, start_step=0)))
    seen, example = [], SequenceBuilder.example

    def recording(self, *args, image_first=False, **kwargs):
        seen.append(image_first)
        return example(self, *args, image_first=image_first, **kwargs)

    monkeypatch.setattr(SequenceBuilder, "example", recording)
    for probability in (0.0, 1.0):
        seen.clear()
        TextToImageTask(model, text_dropout=probability).sequences(batch, torch.Generator().manual_seed(0))
        assert seen == [probability == 1.0] * len(batch)


def test_logs_and_checkpoints_fall_on_their_cadence_and_on_the_last_step(tmp_path):
    """log_every and checkpoint_every count optimiser steps from 1; the last step is always logged and saved."""
    import csv

    from nextstep.training.checkpointing import checkpoint_name

    trainer = tiny_trainer(tmp_path, tiny_config(max_steps=5, log_every=2, checkpoint_every=2, keep_last=5))
    records = trainer.fit(resume=False)
    assert [record.step for record in records] == [1, 2, 3, 4, 5]
    with open(tmp_path / "train_log.csv", newline="") as handle:
        assert [int(row["step"]) for row in csv.DictReader(handle)] == [2, 4, 5]
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == \
        [checkpoint_name(step) for step in (2, 4, 5)]


def test_each_step_logs_the_epoch_its_batches_come_from(tmp_path):
    """Four examples in micro-batches of two: steps 1 and 2 read epoch 0, steps 3 and 4 epoch 1."""
    from nextstep import build_model

    config = tiny_config(max_steps=5)
    trainer = Trainer(TextToImageTask.from_train_config(build_model("tiny", seed=0), config),
                      shapes_data(num_samples=4), config, tmp_path, show_progress=False)
    assert [record.epoch for record in trainer.fit(resume=False)] == [0, 0, 1, 1, 2]


def test_a_grad_clip_of_zero_leaves_the_gradients_unclipped(tmp_path):
    """grad_clip 0 disables clipping: the weights move as far as with an unreachable limit."""
    moved = []
    for grad_clip in (0.0, 1e9):
        trainer = tiny_trainer(tmp_path / str(grad_clip), tiny_config(max_steps=1, warmup_steps=0,
                                                                      grad_clip=grad_clip))
        start = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
        trainer.fit(resume=False)
        moved.append({name: p.detach() - start[name] for name, p in trainer.model.named_parameters()})
    for name, delta in moved[0].items():
        torch.testing.assert_close(delta, moved[1][name], msg=name)
    assert max(delta.abs().max().item() for delta in moved[0].values()) > 1e-4


def test_the_task_takes_text_dropout_context_noise_and_packing_from_the_run_config():
    """A run's text_dropout (None: the model's own image_first_probability), context_noise and pack_length."""
    from nextstep import build_model

    model = build_model("tiny", seed=0)
    task = TextToImageTask.from_train_config(model, tiny_config(text_dropout=0.0, context_noise=0.5, pack_length=64))
    assert (task.text_dropout, task.context_noise, task.pack_length) == (0.0, 0.5, 64)
    assert TextToImageTask.from_train_config(model, tiny_config()).text_dropout == model.config.image_first_probability


def test_a_step_counts_the_tokens_of_its_sequences_not_their_padding():
    """num_tokens (the throughput's numerator) counts the positions of each sequence, not the padding
    that makes a short caption's row as long as the longest."""
    from nextstep import build_model

    model = build_model("tiny", seed=0)
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    captions = ["a", "a much longer caption than the first"]
    batch = model.prepare_batch(pixels, captions, image_first=[False, False])
    alone = [model.prepare_batch(pixels[i:i + 1], captions[i:i + 1], image_first=[False]).input_ids.shape[1]
             for i in range(2)]
    assert alone[0] < alone[1]
    result = TextToImageTask(model).loss(model, batch, torch.Generator().manual_seed(0))
    assert result.num_tokens == sum(alone)


def test_sample_grids_are_drawn_every_sample_every_steps(tmp_path):
    """sample_every counts optimiser steps from 1, like the checkpoints: grids at steps 2 and 4 of 4."""
    config = tiny_config(max_steps=4, sample_every=2, sample_prompts=("a red circle",), sample_height=32,
                         sample_width=32, sample_steps=2)
    tiny_trainer(tmp_path, config).fit(resume=False)
    assert sorted(path.name for path in (tmp_path / "samples").iterdir()) == ["step-00000002.png",
                                                                             "step-00000004.png"]


def test_a_sample_grid_that_fails_comes_after_the_step_s_checkpoint(tmp_path, monkeypatch):
    config = tiny_config(max_steps=4, checkpoint_every=2, sample_every=2, sample_prompts=("a red circle",),
                         sample_height=32, sample_width=32, sample_steps=2)
    trainer = tiny_trainer(tmp_path, config)

    def failing():
        raise RuntimeError("out of memory while drawing")

    monkeypatch.setattr(trainer, "write_samples", failing)
    with pytest.raises(RuntimeError, match="out of memory while drawing"):
        trainer.fit(resume=False)
    assert trainer.checkpoints.steps() == [2]  # the step's work is kept: a rerun resumes from it


def test_a_run_that_ends_in_its_warm_up_is_warned_of(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="nextstep.training"):
        tiny_trainer(tmp_path, tiny_config(max_steps=4, warmup_steps=10))
    assert "train.warmup_steps 10 is not below train.max_steps 4: the run ends in its warm-up, at 0.4 of the " \
           "peak learning rate" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="nextstep.training"):
        tiny_trainer(tmp_path, tiny_config(max_steps=4, warmup_steps=3))
    assert "warm-up" not in caplog.text


@pytest.mark.filterwarnings("ignore:CUDA is not available")  # autocast for a CUDA device on a machine without one
def test_auto_precision_takes_bf16_only_where_the_gpu_computes_in_it_natively(monkeypatch):
    import contextlib

    import nextstep.training.trainer as trainer_module

    asked = []
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    for native in (False, True):  # a pre-Ampere GPU emulates bf16; an Ampere or later one computes in it
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True, native=native: asked.append(including_emulation)
                            or native or including_emulation)
        assert trainer_module.native_bf16(torch.device("cuda", 0)) is native
        context = autocast_context("auto", torch.device("cuda", 0))
        assert isinstance(context, torch.autocast) is native
    assert set(asked) == {False}


def _line_task(model):
    """A linear fit of `_Points` whose metric is its micro-batch's place in the step (1, 2, ...), and which
    notes, for each micro-batch, the dtype its forward pass computed in."""
    from nextstep.training import StepResult, TrainingTask

    class Line(TrainingTask):
        def __init__(self, model):
            super().__init__(model)
            self.calls, self.dtypes = 0, []

        def loss(self, module, batch, generator):
            x, y = batch
            prediction = module(x)
            self.dtypes.append(prediction.dtype)
            self.calls += 1
            error = prediction.float() - y
            return StepResult(loss=error.pow(2).mean(), metrics={"place": float(self.calls)}, num_tokens=len(x))

    return Line(model)


def test_each_step_runs_at_the_scheduled_rate_in_every_parameter_group(tmp_path):
    from nextstep.training import WarmupCosineSchedule

    config = tiny_config(max_steps=5, warmup_steps=2, learning_rate=1e-3, min_learning_rate=1e-4)
    trainer = tiny_trainer(tmp_path, config)
    seen, step = [], trainer.optimizer.step

    def recording_step(*args, **kwargs):
        seen.append([group["lr"] for group in trainer.optimizer.param_groups])
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    records = trainer.fit(resume=False)
    expected = [WarmupCosineSchedule(1e-3, 2, 5, minimum=1e-4).rate(s) for s in range(5)]
    assert [record.learning_rate for record in records] == pytest.approx(expected)
    assert len(trainer.optimizer.param_groups) == 2
    assert seen == [[pytest.approx(rate)] * 2 for rate in expected]


def test_a_step_adds_up_the_tokens_and_averages_the_metrics_of_its_micro_batches(tmp_path):
    from torch import nn

    from nextstep.training import TrainConfig

    config = TrainConfig(max_steps=1, micro_batch_size=4, gradient_accumulation=3, warmup_steps=0, log_every=1)
    record = Trainer(_line_task(nn.Linear(1, 1)), _Points(), config, tmp_path, show_progress=False).fit()[0]
    assert record.tokens == 12
    assert record.metrics["place"] == pytest.approx(2.0)  # (1 + 2 + 3) / 3


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_the_loss_is_computed_in_the_precision_of_the_run(tmp_path, precision, dtype):
    from torch import nn

    from nextstep.training import TrainConfig

    config = TrainConfig(max_steps=1, micro_batch_size=4, gradient_accumulation=2, warmup_steps=0,
                         precision=precision)
    task = _line_task(nn.Linear(1, 1))
    Trainer(task, _Points(), config, tmp_path, show_progress=False).fit()
    assert task.dtypes == [dtype, dtype]
    with autocast_context(precision, torch.device("cpu")):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == dtype


def test_only_the_last_micro_batch_of_a_step_synchronises_the_gradients(tmp_path, monkeypatch):
    from contextlib import contextmanager

    from torch import nn

    from nextstep.training import TrainConfig

    config = TrainConfig(max_steps=2, micro_batch_size=2, gradient_accumulation=3, warmup_steps=0)
    task = _line_task(nn.Linear(1, 1))
    trainer = Trainer(task, _Points(), config, tmp_path, show_progress=False)
    skipping, seen = [False], []

    @contextmanager
    def no_gradient_sync(module):
        skipping[0] = True
        try:
            yield
        finally:
            skipping[0] = False

    real_loss = task.loss
    monkeypatch.setattr(trainer.context, "no_gradient_sync", no_gradient_sync)
    monkeypatch.setattr(task, "loss", lambda *args: seen.append(skipping[0]) or real_loss(*args))
    trainer.fit()
    assert seen == [True, True, False] * 2


def test_sample_grids_are_drawn_with_the_weight_average_and_training_goes_on_with_the_weights(tmp_path, monkeypatch):
    config = tiny_config(max_steps=2, ema_decay=0.5, learning_rate=1e-2, warmup_steps=0)
    trainer = tiny_trainer(tmp_path, config)
    trainer.fit(resume=False)
    weights = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    drawn_with = {}

    def sample_images(**settings):
        drawn_with.update({name: p.detach().clone() for name, p in trainer.model.named_parameters()})
        drawn_with["training"] = trainer.model.training
        return []

    monkeypatch.setattr(trainer.task, "sample_images", sample_images)
    trainer.write_samples()
    assert drawn_with.pop("training") is False
    assert any(not torch.equal(weights[name], drawn_with[name]) for name in trainer.ema.shadow)
    for name, average in trainer.ema.shadow.items():
        torch.testing.assert_close(drawn_with[name], average, rtol=0, atol=0)
    for name, parameter in trainer.model.named_parameters():
        assert torch.equal(parameter, weights[name])
    assert trainer.model.training


def test_a_model_handed_over_in_eval_mode_trains_in_train_mode(tmp_path):
    from nextstep import build_model

    model = build_model("tiny", seed=0).eval()
    config = tiny_config(max_steps=1)
    trainer = Trainer(TextToImageTask.from_train_config(model, config), shapes_data(), config, tmp_path,
                      show_progress=False)
    assert trainer.model.training and trainer.model.backbone.training
