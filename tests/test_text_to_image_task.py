"""The text-to-image training task: its settings, how it builds sequences from a data batch, and what it asks
the model for."""

import pytest
import torch

from nextstep import build_model
from nextstep.model import LossOutput
from nextstep.training import TextToImageTask
from nextstep.training.data.base import ImageTextBatch
from nextstep.training.task import StepResult, TrainingTask


@pytest.fixture(scope="module")
def model():
    return build_model("tiny", seed=0)


def test_settings_outside_their_ranges_are_refused(model):
    """text_dropout is a probability in [0, 1] and context_noise a scale >= 0 (NaN is neither); the bounds are fine."""
    for bad in (1.5, -0.1):
        with pytest.raises(ValueError, match=rf"text_dropout must be in \[0, 1\], found {bad}"):
            TextToImageTask(model, text_dropout=bad)
    for bad in (-0.5, float("nan")):
        with pytest.raises(ValueError, match=rf"context_noise must be >= 0, found {bad}"):
            TextToImageTask(model, context_noise=bad)
    with pytest.raises(ValueError, match=r"text_dropout must be in \[0, 1\], found nan"):
        TextToImageTask(model, text_dropout=float("nan"))
    assert TextToImageTask(model, text_dropout=1.0, context_noise=0.0).text_dropout == 1.0
    assert TextToImageTask(model, text_dropout=0.0).text_dropout == 0.0


def test_cached_tokens_keep_their_grid_height_and_width(model):
    """A batch of cached tokens (B 2, N 2 x 3, D) of grid (2, 3) is laid out as '2*3' images, tokens in order."""
    tokens = torch.randn(2, 6, model.token_dim, generator=torch.Generator().manual_seed(0))
    data = ImageTextBatch(keys=["a", "b"], captions=["a cat", "a dog"], tokens=tokens, grid=(2, 3))
    task = TextToImageTask(model, text_dropout=0.0)
    batch = task.sequences(data, torch.Generator().manual_seed(0))
    builder = model.sequences
    for row, caption in enumerate(data.captions):
        assert builder.parse(batch.input_ids[row].tolist()) == (caption, 2, 3)
        torch.testing.assert_close(batch.image_tokens[row][batch.image_mask[row]], tokens[row])
    encoded, height, width = task.encode(None, tokens, (2, 3))
    assert encoded is tokens and (height, width) == (2, 3)


class _Recorder(torch.nn.Module):
    """Stands in for the model in `TextToImageTask.loss`: records the call, returns fixed losses."""

    def forward(self, batch, **kwargs):
        self.kwargs = kwargs
        return LossOutput(torch.tensor(0.75), torch.tensor(2.0), torch.tensor(0.5), 1, 1)


def test_the_loss_asks_the_model_for_its_context_noise_and_the_step_s_denominators(model):
    """The task calls the model with its context_noise and, given the step's totals, with (text, image)
    denominators in that order; it reports the model's total and terms."""
    task = TextToImageTask(model, text_dropout=0.0, context_noise=0.3)
    data = ImageTextBatch(keys=["a"], captions=["a cat"], tokens=torch.zeros(1, 4, model.token_dim), grid=(2, 2))
    prepared = task.prepare(data, torch.Generator().manual_seed(0))
    recorder = _Recorder()
    result = task.loss(recorder, prepared, torch.Generator().manual_seed(0), totals={"text": 40.0, "image": 12.0})
    assert recorder.kwargs["context_noise"] == 0.3
    assert recorder.kwargs["denominators"].tolist() == [40.0, 12.0]
    assert result.loss.item() == 0.75 and result.metrics == {"text_loss": 2.0, "image_loss": 0.5}
    task.loss(recorder, prepared, torch.Generator().manual_seed(0))
    assert recorder.kwargs["denominators"] is None


def test_only_a_task_that_counts_targets_is_given_the_step_s_totals(model):
    """A task that does not override target_counts names no counts, so the loop calls its loss without totals;
    the text-to-image task names its text and image counts."""
    class Plain(TrainingTask):
        def loss(self, module, batch, generator):
            return StepResult(loss=torch.zeros(()))

    plain = Plain(torch.nn.Linear(1, 1))
    assert plain.target_counts(None) == {}
    assert not plain.names_target_counts and not plain.counts_targets
    task = TextToImageTask(model)
    assert task.names_target_counts and task.counts_targets
    data = ImageTextBatch(keys=["a"], captions=["ab"], tokens=torch.zeros(1, 4, model.token_dim), grid=(2, 2))
    prepared = task.prepare(data, torch.Generator().manual_seed(0))
    text, image = prepared.target_counts()
    assert task.target_counts(prepared) == {"text": text, "image": image} and image == 4
