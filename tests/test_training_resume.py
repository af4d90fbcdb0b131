"""Resume equals an uninterrupted run; a save killed with SIGKILL leaves the previous checkpoint usable."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from training_helpers import tiny_config, tiny_trainer

from nextstep import NextStep, build_model
from nextstep.training.checkpointing import CheckpointManager
from nextstep.training.logging import read_log

TESTS = Path(__file__).resolve().parent


def test_resumed_run_repeats_the_uninterrupted_losses(tmp_path):
    # The first part stops through its max_steps, inside the warm-up, whose rates do not depend on it.
    config = tiny_config(max_steps=6, warmup_steps=4, gradient_accumulation=2, ema_decay=0.9, checkpoint_every=3)
    uninterrupted = tiny_trainer(tmp_path / "straight", config).fit(resume=False)

    first = tiny_trainer(tmp_path / "split", config.replace(max_steps=3)).fit(resume=False)
    resumed_trainer = tiny_trainer(tmp_path / "split", config)  # fresh model, optimiser, data
    second = resumed_trainer.fit(resume=True)

    assert [r.step for r in second] == [4, 5, 6]
    for straight, split in zip(uninterrupted, first + second):
        assert abs(straight.loss - split.loss) <= 1e-6
        assert abs(straight.grad_norm - split.grad_norm) <= 1e-6
    losses = [row["loss"] for row in read_log(tmp_path / "split" / "train_log.csv")]
    assert losses == pytest.approx([r.loss for r in uninterrupted], abs=1e-6)



def test_resume_is_exact_with_an_image_tokenizer_that_samples_its_posterior(tmp_path):
    """A sampled posterior draws from the step's generator, not from the global one that a data loader's
    start (or anything else in the process) moves."""
    config = tiny_config(max_steps=4, checkpoint_every=2)

    def trainer(folder, train_config):
        built = tiny_trainer(folder, train_config)
        tokenizer = built.model.image_tokenizer
        tokenizer.config = tokenizer.config.replace(deterministic=False)
        assert tokenizer.samples_latents
        return built

    uninterrupted = trainer(tmp_path / "straight", config).fit(resume=False)
    first = trainer(tmp_path / "split", config.replace(max_steps=2)).fit(resume=False)
    torch.rand(7)  # the global generator moves between the runs
    second = trainer(tmp_path / "split", config).fit(resume=True)
    assert [r.loss for r in first + second] == pytest.approx([r.loss for r in uninterrupted], abs=1e-6)


def test_starting_over_sets_the_earlier_run_aside(tmp_path):
    """A run that starts over in a used folder keeps its own checkpoints (pruning by step would otherwise
    delete them for the earlier run's later ones) and leaves the earlier run whole in earlier-runs/."""
    config = tiny_config(max_steps=4, checkpoint_every=1, keep_last=2)
    tiny_trainer(tmp_path, config).fit(resume=False)
    earlier_log = (tmp_path / "train_log.csv").read_text()
    again = tiny_trainer(tmp_path, config.replace(max_steps=2))
    again.fit(resume=False)
    assert again.checkpoints.steps() == [1, 2]
    assert CheckpointManager(tmp_path / "earlier-runs" / "1" / "checkpoints").steps() == [3, 4]
    assert (tmp_path / "earlier-runs" / "1" / "train_log.csv").read_text() == earlier_log
    assert [row["step"] for row in read_log(tmp_path / "train_log.csv")] == [1, 2]
    assert tiny_trainer(tmp_path, config).resume() == 2  # a later resume continues the new run
    tiny_trainer(tmp_path, config.replace(max_steps=1)).fit(resume=False)
    assert sorted(p.name for p in (tmp_path / "earlier-runs").iterdir()) == ["1", "2"]


def test_resuming_with_another_seed_or_global_batch_is_refused(tmp_path):
    config = tiny_config(max_steps=2, checkpoint_every=1)
    tiny_trainer(tmp_path, config.replace(max_steps=1)).fit(resume=False)
    with pytest.raises(ValueError, match="trained with seed 0 but this run has seed 5"):
        tiny_trainer(tmp_path, config.replace(seed=5)).fit()
    with pytest.raises(ValueError, match="global batch of"):
        tiny_trainer(tmp_path, config.replace(micro_batch_size=config.micro_batch_size + 1)).fit()


def test_a_refused_resume_loads_nothing_and_a_second_fit_is_refused_again_rather_than_overwriting(tmp_path):
    config = tiny_config(max_steps=3, checkpoint_every=1, ema_decay=0.9)
    tiny_trainer(tmp_path, config.replace(max_steps=2)).fit(resume=False)
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    log = (tmp_path / "train_log.csv").read_text()
    other = tiny_trainer(tmp_path, config.replace(seed=5))
    before = {name: tensor.clone() for name, tensor in other.model.state_dict().items()}
    for _ in range(2):
        with pytest.raises(ValueError, match="trained with seed 0 but this run has seed 5"):
            other.fit()
        assert all(torch.equal(tensor, before[name]) for name, tensor in other.model.state_dict().items())
        assert not other.optimizer.state and other.step == 0
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == checkpoints
    assert (tmp_path / "train_log.csv").read_text() == log


def test_a_checkpoint_whose_files_do_not_fit_is_refused_before_the_model_changes(tmp_path):
    config = tiny_config(max_steps=2, checkpoint_every=1, ema_decay=0.9)
    tiny_trainer(tmp_path, config.replace(max_steps=1)).fit(resume=False)
    ema_file = tmp_path / "checkpoints" / "step-00000001" / "ema.safetensors"
    from safetensors.torch import load_file, save_file

    average = load_file(ema_file)
    save_file(dict(list(average.items())[1:]), ema_file)  # one average missing
    other = tiny_trainer(tmp_path, config)
    before = {name: tensor.clone() for name, tensor in other.model.state_dict().items()}
    with pytest.raises(ValueError):
        other.fit()
    assert all(torch.equal(tensor, before[name]) for name, tensor in other.model.state_dict().items())
    assert not other.optimizer.state


def test_resuming_with_another_loss_averaging_is_refused_when_a_step_has_several_micro_batches(tmp_path):
    config = tiny_config(max_steps=2, checkpoint_every=1, gradient_accumulation=2, loss_averaging="micro_batch")
    tiny_trainer(tmp_path, config.replace(max_steps=1)).fit(resume=False)
    with pytest.raises(ValueError, match="loss_averaging 'micro_batch' but this run has 'step'.*"
                                         "train.loss_averaging=micro_batch"):
        tiny_trainer(tmp_path, config.replace(loss_averaging="step")).fit()
    # A checkpoint from before the setting averaged each micro-batch apart.
    state_file = next((tmp_path / "checkpoints").iterdir()) / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["config"]["loss_averaging"]
    state_file.write_text(json.dumps(state))
    with pytest.raises(ValueError, match="loss_averaging 'micro_batch'"):
        tiny_trainer(tmp_path, config.replace(loss_averaging="step")).fit()
    assert tiny_trainer(tmp_path, config).fit()[-1].step == 2
    # With one micro-batch per step the two settings train alike: no refusal.
    single = tiny_config(max_steps=2, checkpoint_every=1, loss_averaging="micro_batch")
    tiny_trainer(tmp_path / "single", single.replace(max_steps=1)).fit(resume=False)
    assert tiny_trainer(tmp_path / "single", single.replace(loss_averaging="step")).fit()[-1].step == 2


def test_log_rows_after_the_checkpoint_are_dropped_on_resume(tmp_path):
    tiny_trainer(tmp_path, tiny_config(max_steps=4, checkpoint_every=2)).fit(resume=False)
    # Pretend the run died after step 3: only the step-2 checkpoint survives.
    manager = CheckpointManager(tmp_path / "checkpoints")
    import shutil

    shutil.rmtree(manager.latest())
    assert manager.steps() == [2]
    with open(tmp_path / "train_log.csv", "a") as log:  # and it died writing a row
        log.write("1")
    tiny_trainer(tmp_path, tiny_config(max_steps=4, checkpoint_every=2)).fit(resume=True)
    steps = [int(row["step"]) for row in read_log(tmp_path / "train_log.csv")]
    assert steps == [1, 2, 3, 4]


def test_a_run_resumed_from_an_earlier_checkpoint_sets_the_later_ones_aside(tmp_path):
    tiny_trainer(tmp_path, tiny_config(max_steps=4, checkpoint_every=2, keep_last=2)).fit()
    checkpoints = tmp_path / "checkpoints"
    again = tiny_trainer(tmp_path, tiny_config(max_steps=4, checkpoint_every=1, keep_last=1))
    assert again.resume(checkpoints / "step-00000002") == 2
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000002"]
    assert (tmp_path / "earlier-runs" / "1" / "checkpoints" / "step-00000004").is_dir()  # kept, not deleted
    again.fit()  # keep_last 1 keeps the newest checkpoint of this timeline
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000004"]


def test_a_max_steps_below_the_checkpoint_is_refused(tmp_path):
    tiny_trainer(tmp_path, tiny_config(max_steps=4, checkpoint_every=2)).fit()
    with pytest.raises(ValueError, match=r"is at step 4, past this run's max_steps 2; raise train.max_steps"):
        tiny_trainer(tmp_path, tiny_config(max_steps=2, checkpoint_every=2)).fit()
    assert tiny_trainer(tmp_path, tiny_config(max_steps=4, checkpoint_every=2)).fit() == []  # a finished run


def test_checkpoint_directory_loads_as_a_model(tmp_path):
    trainer = tiny_trainer(tmp_path, tiny_config(max_steps=1))
    trainer.fit(resume=False)
    loaded = NextStep.from_pretrained(tmp_path / "checkpoints" / "step-00000001")
    for name, tensor in trainer.task.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)


KILLED_SAVER = r"""
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from training_helpers import tiny_config, tiny_trainer

ready = Path({ready!r})

def pause_in_second_save(path, written, total):
    # Stop for good inside the save of step 2, after part of the weights file is on disk.
    if path.parent.name.startswith(".step-00000002") and path.name == "model.safetensors":
        if written < total:
            ready.write_text(str(path))
            time.sleep(600)

trainer = tiny_trainer({output!r}, tiny_config(max_steps=4, checkpoint_every=1),
                       checkpoint_write_hook=pause_in_second_save)
trainer.fit(resume=False)
"""


def test_sigkill_during_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    ready = tmp_path / "ready"
    output = tmp_path / "run"
    code = KILLED_SAVER.format(tests=str(TESTS), ready=str(ready), output=str(output))
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            if process.poll() is not None:
                raise AssertionError(f"the saver exited early:\n{process.stderr.read().decode()}")
            if time.monotonic() > deadline:
                raise TimeoutError("the saver never reached the pause inside the save")
            time.sleep(0.05)
        partial = Path(ready.read_text())
        assert partial.exists() and 0 < partial.stat().st_size
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL

    manager = CheckpointManager(output / "checkpoints")
    assert manager.steps() == [1]  # the half-written step 2 is not a checkpoint
    leftovers = [p.name for p in (output / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers, "the interrupted save should have left its hidden staging folder"
    NextStep.from_pretrained(manager.latest())

    resumed = tiny_trainer(output, tiny_config(max_steps=4, checkpoint_every=1))
    records = resumed.fit(resume=True)
    assert [r.step for r in records] == [2, 3, 4]
    assert not [p for p in (output / "checkpoints").iterdir() if p.name.startswith(".")]
    assert manager.steps() == [3, 4]  # keep_last=2

    straight = tiny_trainer(tmp_path / "straight", tiny_config(max_steps=4)).fit(resume=False)
    assert [r.loss for r in records] == pytest.approx([r.loss for r in straight[1:]], abs=1e-6)


def test_bad_samples_are_counted_for_the_whole_job_and_kept_across_a_resume(tmp_path):
    from types import SimpleNamespace

    from nextstep.training.data.base import DataQualityError

    trainer = tiny_trainer(tmp_path, tiny_config(max_steps=1, max_bad_fraction=0.03))  # 64 samples: limit 1.92
    trainer.tracker.update(10, ["a.png"])
    assert trainer.trainer_state()["bad_samples"] == {"bad": ["a.png"], "reads": 10}
    # Saved by processes that counted apart: the counts of all of them together.
    saved = [{"bad": ["a.png"], "reads": 10}, {"bad": ["b.png"], "reads": 7}]
    assert trainer._own_bad_samples(saved) == {"bad": ["a.png", "b.png"], "reads": 17}
    assert trainer._own_bad_samples({"bad": ["c.png"], "reads": 3}) == {"bad": ["c.png"], "reads": 3}

    # Two processes, one bad sample each this step: the job holds 3 and stops on both processes alike.
    other_rank = ["d.png"]
    trainer.context = SimpleNamespace(is_distributed=True, sum=lambda values: [2 * v for v in values],
                                      gather_objects=lambda value: [value, other_rank])
    with pytest.raises(DataQualityError, match="3 unreadable samples of the 64"):
        trainer._count_bad_samples(4, ["c.png"])
    assert trainer.tracker.state_dict() == {"bad": ["a.png", "c.png", "d.png"], "reads": 18}


def test_a_resumed_run_takes_its_optimiser_settings_from_its_config_and_its_clock_goes_on(tmp_path):
    from nextstep.training.logging import read_log

    tiny_trainer(tmp_path, tiny_config(max_steps=2, checkpoint_every=1, weight_decay=0.1)).fit(resume=False)
    first_rows = read_log(tmp_path / "train_log.csv")
    changed = tiny_config(max_steps=3, checkpoint_every=1, weight_decay=0.0, betas=(0.8, 0.99), eps=1e-6)
    resumed = tiny_trainer(tmp_path, changed)
    resumed.resume()
    groups = resumed.optimizer.param_groups
    assert [(g["weight_decay"], tuple(g["betas"]), g["eps"]) for g in groups] == [(0.0, (0.8, 0.99), 1e-6)] * 2
    assert resumed.optimizer.state  # the moments themselves come from the checkpoint
    resumed.fit(resume=True)
    elapsed = [row["elapsed_seconds"] for row in read_log(tmp_path / "train_log.csv")]
    assert elapsed[:2] == [row["elapsed_seconds"] for row in first_rows]
    assert elapsed[2] > elapsed[1]  # counted on from the checkpoint, not from 0


def test_a_stream_resumes_only_with_the_split_it_was_read_with(tmp_path):
    from test_data_webdataset import write_shards

    from nextstep.training import AspectRatioBuckets, TextToImageTask, Trainer, TrainingData
    from nextstep.training.data import WebDataset, WebDatasetConfig

    data = TrainingData(WebDataset(WebDatasetConfig(shards=(write_shards(tmp_path / "shards"),))),
                        AspectRatioBuckets(32, multi_aspect=False))

    def trainer(config):
        model = build_model("tiny", seed=0)
        return Trainer(TextToImageTask(model), data, config, tmp_path / "run", show_progress=False)

    config = tiny_config(max_steps=1, checkpoint_every=1)
    trainer(config).fit(resume=False)
    with pytest.raises(ValueError, match=r"1 process\(es\) x 1 loader worker\(s\) in micro-batches of 2 but "
                                         r"this run has 1 x 2 in micro-batches of 2"):
        trainer(config.replace(max_steps=2, num_workers=2)).resume()
    # The same global batch cut into other micro-batches resumes at another point of the stream.
    with pytest.raises(ValueError, match=r"in micro-batches of 2 but this run has 1 x 1 in micro-batches of 1"):
        trainer(config.replace(max_steps=2, micro_batch_size=1, gradient_accumulation=2)).resume()
    assert trainer(config.replace(max_steps=2, num_workers=1)).resume() == 1  # one worker reads as the process does


def test_a_stream_logs_the_epoch_its_batches_come_from(tmp_path):
    from test_data_webdataset import write_shards

    from nextstep.training import AspectRatioBuckets, TextToImageTask, Trainer, TrainingData
    from nextstep.training.data import WebDataset, WebDatasetConfig

    # 2 shards of 3 samples in one bucket: a pass makes 3 micro-batches of 2, a step takes 2.
    shards = WebDataset(WebDatasetConfig(shards=(write_shards(tmp_path / "shards", num_shards=2, per_shard=3),),
                                         shuffle_buffer=1))
    data = TrainingData(shards, AspectRatioBuckets(32, multi_aspect=False))
    config = tiny_config(max_steps=4, checkpoint_every=10, log_every=1, gradient_accumulation=2)
    Trainer(TextToImageTask(build_model("tiny", seed=0)), data, config, tmp_path / "run",
            show_progress=False).fit(resume=False)
    assert [int(row["epoch"]) for row in read_log(tmp_path / "run" / "train_log.csv")] == [0, 1, 1, 2]


def test_the_clock_leaves_out_checkpoint_writes_so_a_resumed_run_counts_as_a_straight_one(tmp_path, monkeypatch):
    """Each step takes one second of a fake clock and each checkpoint write a hundred."""
    import types

    import nextstep.training.trainer as trainer_module

    now = [0.0]
    monkeypatch.setattr(trainer_module, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    real_step, real_save = trainer_module.Trainer.train_step, trainer_module.Trainer.save_checkpoint

    def step(self, batches):
        now[0] += 1.0
        return real_step(self, batches)

    def save(self):  # the state is recorded as the write begins
        saved = real_save(self)
        now[0] += 100.0
        return saved

    monkeypatch.setattr(trainer_module.Trainer, "train_step", step)
    monkeypatch.setattr(trainer_module.Trainer, "save_checkpoint", save)
    tiny_trainer(tmp_path / "straight", tiny_config(max_steps=4, checkpoint_every=2)).fit(resume=False)
    tiny_trainer(tmp_path / "split", tiny_config(max_steps=2, checkpoint_every=2)).fit(resume=False)
    tiny_trainer(tmp_path / "split", tiny_config(max_steps=4, checkpoint_every=2)).fit(resume=True)
    for run in ("straight", "split"):
        elapsed = [row["elapsed_seconds"] for row in read_log(tmp_path / run / "train_log.csv")]
        assert elapsed == [1.0, 2.0, 3.0, 4.0], run
        state = json.loads((tmp_path / run / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
        assert state["elapsed_seconds"] == 4.0


def test_resuming_without_the_average_a_checkpoint_holds_says_so(tmp_path):
    tiny_trainer(tmp_path, tiny_config(max_steps=1, checkpoint_every=1, ema_decay=0.9)).fit(resume=False)
    with pytest.warns(UserWarning, match="holds a weight average that this run does not keep"):
        tiny_trainer(tmp_path, tiny_config(max_steps=2, checkpoint_every=1)).fit(resume=True)


def test_a_log_row_a_crash_cut_short_is_dropped_when_the_log_is_reopened(tmp_path):
    from nextstep.training.logging import CSVLog

    path = tmp_path / "log.csv"
    path.write_text("step,loss\n1,1.0\n2,0.5\n3,0.12")  # the crash came while "0.125\n" was written
    log = CSVLog(path, columns=("step", "loss"))
    assert read_log(path) == [{"step": 1.0, "loss": 1.0}, {"step": 2.0, "loss": 0.5}]
    log.write({"step": 3, "loss": 0.125})
    assert read_log(path)[-1] == {"step": 3.0, "loss": 0.125} and len(read_log(path)) == 3


def test_a_metric_that_first_appears_later_widens_the_log_and_keeps_the_earlier_rows(tmp_path):
    from nextstep.training.logging import CSVLog

    path = tmp_path / "log.csv"
    log = CSVLog(path, columns=("step", "loss"))
    log.write({"step": 1, "loss": 1.0})
    log.write({"step": 2, "loss": 0.5})
    log.write({"step": 3, "loss": 0.25, "margin": 0.1})
    assert read_log(path) == [{"step": 1.0, "loss": 1.0}, {"step": 2.0, "loss": 0.5},
                              {"step": 3.0, "loss": 0.25, "margin": 0.1}]
    assert path.read_text().splitlines()[0] == "step,loss,margin"


def test_resuming_from_the_checkpoint_before_the_latest_sets_the_latest_aside(tmp_path):
    tiny_trainer(tmp_path, tiny_config(max_steps=3, checkpoint_every=1, keep_last=3)).fit(resume=False)
    checkpoints = tmp_path / "checkpoints"
    again = tiny_trainer(tmp_path, tiny_config(max_steps=3, checkpoint_every=1, keep_last=3))
    assert again.resume(checkpoints / "step-00000002") == 2
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000001", "step-00000002"]
    assert CheckpointManager(tmp_path / "earlier-runs" / "1" / "checkpoints").steps() == [3]


def test_a_checkpoint_records_the_global_batch_of_every_process(tmp_path):
    from nextstep.training.data.loader import BatchLayout

    trainer = tiny_trainer(tmp_path, tiny_config(max_steps=1, micro_batch_size=2, gradient_accumulation=3))
    assert trainer.trainer_state()["global_batch_size"] == 6
    trainer.layout = BatchLayout(2, 3, 4)  # as a process of a four-process job lays its steps out
    assert trainer.trainer_state()["global_batch_size"] == 24


def test_a_checkpoint_without_its_generator_states_is_refused_before_the_model_changes(tmp_path):
    config = tiny_config(max_steps=2, checkpoint_every=1)
    tiny_trainer(tmp_path, config.replace(max_steps=1)).fit(resume=False)
    (tmp_path / "checkpoints" / "step-00000001" / "rng.pt").unlink()
    other = tiny_trainer(tmp_path, config)
    before = {name: tensor.clone() for name, tensor in other.model.state_dict().items()}
    with pytest.raises((OSError, ValueError)):
        other.fit()
    assert all(torch.equal(tensor, before[name]) for name, tensor in other.model.state_dict().items())
