"""Checkpoint directories: keep-last-K, name-keyed optimiser state, clear errors on damage."""

from pathlib import Path

import pytest
import torch
from torch import nn

from nextstep.training import CheckpointManager, ExponentialMovingAverage, TrainConfig, build_optimizer


def _setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = build_optimizer(model, TrainConfig(learning_rate=1e-2))
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_save_and_load_restore_weights_optimizer_ema_and_rng(tmp_path):
    model, optimizer = _setup()
    ema = ExponentialMovingAverage(model, 0.9)
    manager = CheckpointManager(tmp_path, keep_last=2)
    manager.save(5, model, optimizer, {"note": "x"}, ema=ema)
    expected_random = torch.rand(3)

    fresh_model, fresh_optimizer = _setup(seed=1)
    fresh_ema = ExponentialMovingAverage(fresh_model, 0.9)
    state = manager.load(manager.latest(), fresh_model, fresh_optimizer, ema=fresh_ema)
    assert state["step"] == 5 and state["note"] == "x"
    assert torch.equal(torch.rand(3), expected_random)  # generator state restored
    for a, b in zip(model.parameters(), fresh_model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(optimizer.state.values(), fresh_optimizer.state.values()):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert all(torch.equal(ema.shadow[k], fresh_ema.shadow[k]) for k in ema.shadow)


def test_only_the_last_k_checkpoints_are_kept(tmp_path):
    model, optimizer = _setup()
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3, 4):
        manager.save(step, model, optimizer, {})
    assert manager.steps() == [3, 4]
    assert manager.latest().name == "step-00000004"



def test_a_checkpoint_whose_pruning_stopped_halfway_is_no_checkpoint_and_its_remains_are_cleared(tmp_path,
                                                                                                 monkeypatch):
    import nextstep.io

    model, optimizer = _setup()
    manager = CheckpointManager(tmp_path, keep_last=1)
    manager.save(1, model, optimizer, {})
    monkeypatch.setattr(nextstep.io.shutil, "rmtree", lambda path, **kwargs: None)  # the deletion stops at once
    manager.save(2, model, optimizer, {})
    assert manager.steps() == [2] and not (tmp_path / "step-00000001").exists()
    monkeypatch.undo()
    assert [path.name.startswith(".step-00000001.trash-") for path in manager.remove_stale()] == [True]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["step-00000002"]


def test_a_checkpoint_moved_aside_by_an_interrupted_save_is_put_back(tmp_path):
    """Saving a step that exists moves the old one to step-N.old-*; a crash before the new one is in place
    leaves only that: the next run puts it back instead of deleting it with the other leftovers."""
    model, optimizer = _setup()
    manager = CheckpointManager(tmp_path)
    manager.save(1, model, optimizer, {})
    manager.save(2, model, optimizer, {})
    (tmp_path / "step-00000002").rename(tmp_path / "step-00000002.old-x1y2")
    (tmp_path / ".step-00000002.abc.tmp").mkdir()  # the staging copy the crash left behind
    removed = manager.remove_stale()
    assert manager.steps() == [1, 2] and [path.name for path in removed] == [".step-00000002.abc.tmp"]
    assert manager.load(manager.latest(), model, optimizer)["step"] == 2


def test_a_checkpoint_a_crashed_save_moved_aside_counts_and_is_put_back(tmp_path):
    import time

    model, optimizer = _setup()
    manager = CheckpointManager(tmp_path)
    manager.save(1, model, optimizer, {})
    (tmp_path / "step-00000001").rename(tmp_path / f".step-00000001.moved-aside-{time.time_ns():020d}-x")
    assert manager.latest() is None and manager.holds_checkpoint()
    manager.remove_stale()
    assert manager.steps() == [1] and sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]


def test_checkpoint_files_reach_the_disk_before_the_rename(tmp_path, monkeypatch):
    import os

    from nextstep import io

    synced = []
    real_fsync = os.fsync

    def fsync(descriptor):
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        real_fsync(descriptor)

    monkeypatch.setattr(io.os, "fsync", fsync)
    model, optimizer = _setup()
    CheckpointManager(tmp_path).save(1, model, optimizer, {})
    names = {Path(path).name for path in synced}
    assert {"model.safetensors", "optimizer.pt", "trainer_state.json"} <= names, names

def test_damaged_or_mismatched_checkpoints_raise_clear_errors(tmp_path):
    model, optimizer = _setup()
    manager = CheckpointManager(tmp_path)
    path = manager.save(1, model, optimizer, {})
    other = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"mis-shaped keys \[2.bias: expected \(3,\), found \(2,\)"):
        manager.load(path, other, None)
    with pytest.raises(FileNotFoundError, match="this run keeps an EMA"):
        manager.load(path, model, optimizer, ema=ExponentialMovingAverage(model, 0.9))
    (path / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        manager.load(path, model, optimizer)
    with pytest.raises(FileNotFoundError, match="expected a complete checkpoint"):
        manager.load(tmp_path / "step-00000009", model, optimizer)
    (path / "trainer_state.json").write_text('{"step": 1,')
    with pytest.raises(ValueError, match=r"step-00000001/trainer_state\.json is not valid JSON"):
        manager.load(path, model, optimizer)


def test_optimiser_groups_of_other_sizes_are_named(tmp_path):
    model, optimizer = _setup()
    manager = CheckpointManager(tmp_path)
    manager.save(1, model, optimizer, {})
    one_group = torch.optim.AdamW(model.parameters(), lr=1e-2)  # the same parameters, grouped otherwise
    with pytest.raises(ValueError, match=r"it holds groups of \[2, 2\] parameters, this run \[4\]"):
        manager.load(manager.latest(), model, one_group)


def test_the_average_moves_by_one_minus_the_decay_towards_the_weights():
    module = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        module.weight.fill_(0.0)
    average = ExponentialMovingAverage(module, decay=0.9)
    with torch.no_grad():
        module.weight.fill_(1.0)
    average.update(module)
    assert average.shadow["weight"].item() == pytest.approx(0.1)


def test_a_step_folder_without_its_state_file_is_no_checkpoint(tmp_path):
    """A save cut short leaves a folder without the state written last: it is not listed nor resumed from."""
    model, optimizer = _setup()
    manager = CheckpointManager(tmp_path)
    manager.save(1, model, optimizer, {})
    (tmp_path / "step-00000009").mkdir()
    (tmp_path / "step-00000009" / "model.safetensors").write_bytes(b"partial")
    assert manager.steps() == [1]
    assert manager.latest() == tmp_path / "step-00000001"


def test_loading_a_checkpoint_restores_python_and_numpy_random_state(tmp_path):
    import random

    import numpy as np

    model, optimizer = _setup()
    manager = CheckpointManager(tmp_path)
    random.seed(123)
    np.random.seed(123)
    manager.save(1, model, optimizer, {})
    expected = ([random.random() for _ in range(3)], np.random.rand(3).tolist())
    random.seed(999)  # whatever happened since
    np.random.seed(999)
    manager.load(manager.latest(), model, optimizer)
    assert ([random.random() for _ in range(3)], np.random.rand(3).tolist()) == expected


def test_of_several_earlier_backups_the_newest_is_put_back(tmp_path):
    """Of two ``step-N.old-*`` copies a crash left (older saves' naming), the more recently written one
    returns, whatever their names."""
    import os

    model, optimizer = _setup()
    manager = CheckpointManager(tmp_path)
    manager.save(2, model, optimizer, {"note": "older"})
    (tmp_path / "step-00000002").rename(tmp_path / "step-00000002.old-zz")
    manager.save(2, model, optimizer, {"note": "newer"})
    (tmp_path / "step-00000002").rename(tmp_path / "step-00000002.old-aa")
    os.utime(tmp_path / "step-00000002.old-zz", (1_000_000_000, 1_000_000_000))
    os.utime(tmp_path / "step-00000002.old-aa", (1_500_000_000, 1_500_000_000))
    manager.remove_stale()
    assert manager.steps() == [2]
    assert manager.load(manager.latest(), model, optimizer)["note"] == "newer"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["step-00000002"]


def test_keeping_no_checkpoint_is_refused(tmp_path):
    with pytest.raises(ValueError, match="keep_last must be >= 1, found 0"):
        CheckpointManager(tmp_path, keep_last=0)


def test_a_model_with_tied_weights_is_saved_and_restored(tmp_path):
    model, optimizer = _setup()
    model[2].weight = nn.Parameter(torch.randn(2, 8))
    model.add_module("tied", nn.Linear(8, 2))
    model.tied.weight = model[2].weight  # the same tensor under two names
    optimizer = build_optimizer(model, TrainConfig(learning_rate=1e-2))
    manager = CheckpointManager(tmp_path)
    path = manager.save(1, model, optimizer, {})
    fresh, _ = _setup(seed=1)
    fresh[2].weight = nn.Parameter(torch.zeros(2, 8))
    fresh.add_module("tied", nn.Linear(8, 2))
    fresh.tied.weight = fresh[2].weight
    manager.load(path, fresh, None)
    assert torch.equal(fresh.tied.weight, model[2].weight) and fresh.tied.weight is fresh[2].weight


def test_the_optimiser_file_holds_each_parameter_s_own_moments_under_its_name(tmp_path):
    model, optimizer = _setup()
    CheckpointManager(tmp_path).save(1, model, optimizer, {})
    saved = torch.load(tmp_path / "step-00000001" / "optimizer.pt", weights_only=True)
    assert sorted(saved["state"]) == sorted(name for name, _ in model.named_parameters())
    for name, parameter in model.named_parameters():
        assert torch.equal(saved["state"][name]["exp_avg"], optimizer.state[parameter]["exp_avg"]), name
    assert [group["params"] for group in saved["param_groups"]] == [["0.weight", "2.weight"], ["0.bias", "2.bias"]]


def test_saving_a_step_again_replaces_its_checkpoint(tmp_path):
    model, optimizer = _setup()
    manager = CheckpointManager(tmp_path)
    manager.save(1, model, optimizer, {"note": "first"})
    manager.save(1, model, optimizer, {"note": "second"})
    assert manager.steps() == [1]
    assert manager.load(manager.latest(), model, optimizer)["note"] == "second"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["step-00000001"]


def test_each_process_restores_its_own_generator_state(tmp_path):
    from nextstep.training import DistributedContext
    from nextstep.training.checkpointing import capture_rng_state

    model, optimizer = _setup()
    path = CheckpointManager(tmp_path).save(1, model, optimizer, {})
    states = []
    for seed in (10, 11):
        torch.manual_seed(seed)
        states.append(capture_rng_state())
    torch.save(states, path / "rng.pt")
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(0)
    CheckpointManager(tmp_path, context=DistributedContext(rank=1, world_size=2)).load(path, model)
    assert torch.equal(torch.rand(3), expected)


def test_a_pruning_that_fails_warns_and_keeps_the_new_checkpoint(tmp_path, monkeypatch):
    import nextstep.training.checkpointing as checkpointing

    model, optimizer = _setup()
    manager = CheckpointManager(tmp_path, keep_last=1)
    manager.save(1, model, optimizer, {})

    def refuse(path, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(checkpointing, "remove_directory", refuse)
    with pytest.warns(RuntimeWarning, match="could not remove the old checkpoint .*step-00000001 "
                                            r"\(Permission denied\); it stays"):
        manager.save(2, model, optimizer, {})
    assert manager.steps() == [1, 2]
