"""Loop options: gradient checkpointing, bf16 autocast, accumulation semantics, TensorBoard."""

import importlib.util

import pytest
import torch

from nextstep.training.trainer import autocast_context
from training_helpers import tiny_config, tiny_trainer


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


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_tensorboard_without_the_package_says_what_to_install(tmp_path):
    with pytest.raises(ImportError, match="pip install tensorboard"):
        tiny_trainer(tmp_path, tiny_config(max_steps=1, tensorboard=True)).fit(resume=False)
