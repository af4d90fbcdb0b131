"""A finished run's model folder, `export_model` from checkpoints, and context noise in training."""

import json

import pytest
import torch

from nextstep import NextStep, build_model
from nextstep.cli import main
from nextstep.serialization import read_safetensors
from nextstep.training.config import TrainConfig
from nextstep.training.export import export_model

RECIPE = {
    "model": "tiny",
    "data": {"datasets": [{"type": "shapes", "num_samples": 16, "size": 32}], "resolution": 32},
    "train": {"max_steps": 4, "micro_batch_size": 2, "warmup_steps": 1, "learning_rate": 1e-2,
              "log_every": 1, "checkpoint_every": 2, "ema_decay": 0.5, "context_noise": 0.3},
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    recipe = folder / "recipe-in.json"
    recipe.write_text(json.dumps(RECIPE))
    assert main(["train", str(recipe), "-o", str(folder / "run"), "--quiet"]) == 0
    return folder / "run"


def test_finished_run_writes_the_weight_average_as_its_model(finished_run):
    model_weights = read_safetensors(finished_run / "model" / "model.safetensors")
    checkpoint = finished_run / "checkpoints" / "step-00000004"
    average = read_safetensors(checkpoint / "ema.safetensors")
    raw = read_safetensors(checkpoint / "model.safetensors")
    assert average and set(average) <= set(model_weights)
    assert all(torch.equal(model_weights[name], tensor) for name, tensor in average.items())
    assert any(not torch.equal(raw[name], tensor) for name, tensor in average.items())
    NextStep.from_pretrained(finished_run / "model")  # loads as a model folder


def test_export_model_from_a_checkpoint_or_a_run_folder(finished_run, tmp_path):
    exported = export_model(finished_run, tmp_path / "average")
    expected = read_safetensors(finished_run / "model" / "model.safetensors")
    found = read_safetensors(exported / "model.safetensors")
    assert set(found) == set(expected) and all(torch.equal(found[k], expected[k]) for k in expected)
    raw = export_model(finished_run / "checkpoints" / "step-00000002", tmp_path / "raw", use_ema=False,
                       dtype=torch.bfloat16)
    weights = read_safetensors(raw / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}


def test_export_model_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        export_model(tmp_path, tmp_path / "out")
    build_model("tiny", seed=0).save_pretrained(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="use_ema=True but .* has no ema.safetensors"):
        export_model(tmp_path / "plain", tmp_path / "out", use_ema=True)
    assert not (tmp_path / "out").exists()


def test_export_model_writes_the_raw_weights_of_a_run_that_kept_no_average_as_the_run_does(tmp_path):
    model = build_model("tiny", seed=0)
    model.save_pretrained(tmp_path / "plain")  # a checkpoint folder without ema.safetensors
    exported = read_safetensors(export_model(tmp_path / "plain", tmp_path / "out") / "model.safetensors")
    saved = read_safetensors(tmp_path / "plain" / "model.safetensors")
    assert set(exported) == set(saved) and all(torch.equal(exported[k], saved[k]) for k in saved)


def test_context_noise_changes_only_what_the_transformer_reads():
    model = build_model("tiny", seed=0)
    tokens = torch.randn(2, 4, model.token_dim)
    batch = model.sequences.collate([model.sequences.example("a red circle", tokens[i], 2, 2) for i in range(2)])

    def losses(noise, seed=0):
        with torch.no_grad():
            out = model(batch, generator=torch.Generator().manual_seed(seed), context_noise=noise)
        return float(out.text), float(out.image)

    assert losses(0.0) == losses(0.0)
    assert losses(0.5)[1] != losses(0.0)[1]
    assert losses(0.5) == losses(0.5)  # drawn from the generator: reproducible
    with pytest.raises(ValueError, match="context_noise"):
        TrainConfig(context_noise=-0.1)


def test_export_model_casts_the_weight_average_to_the_dtype_asked_for(finished_run, tmp_path):
    exported = export_model(finished_run, tmp_path / "average-bf16", dtype=torch.bfloat16)
    weights = read_safetensors(exported / "model.safetensors")
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.bfloat16}
    average = read_safetensors(finished_run / "checkpoints" / "step-00000004" / "ema.safetensors")
    assert all(torch.equal(weights[name], tensor.to(torch.bfloat16)) for name, tensor in average.items())


def test_export_in_a_dtype_stores_every_part_in_it(tmp_path):
    from nextstep.weights import read_checkpoint_index

    build_model("tiny", seed=0).save_pretrained(tmp_path / "half", storage_dtypes={
        "image_tokenizer.decoder": torch.float16})
    exported = export_model(tmp_path / "half", tmp_path / "bf16", use_ema=False, dtype=torch.bfloat16)
    stored = {info.dtype for info in read_checkpoint_index(exported / "model.safetensors").values()}
    assert stored == {"BF16"}
