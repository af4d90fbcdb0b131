"""Two gloo processes on CPU train the same model as one process with the same global batch."""

import time

import pytest
import torch
import torch.multiprocessing as mp
from training_helpers import distributed_worker, free_port, tiny_config, tiny_trainer

from nextstep import build_model
from nextstep.serialization import read_safetensors
from nextstep.training.logging import read_log

STEPS = 3


def _run_two_processes(output_dir, config, timeout_s: float = 120.0, resume: bool = False) -> None:
    context = mp.start_processes(distributed_worker,
                                 args=(2, free_port(), str(output_dir), config.to_dict(), resume),
                                 nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the 2-process run did not finish within {timeout_s} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


def _final_dir(output_dir):
    return output_dir / "checkpoints" / f"step-{STEPS:08d}"


def _final_state(output_dir):
    return read_safetensors(_final_dir(output_dir) / "model.safetensors")


@pytest.mark.parametrize("parallelism", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, parallelism):
    torch.set_num_threads(1)
    single = tiny_trainer(tmp_path / "single", tiny_config(max_steps=STEPS, gradient_accumulation=2))
    single.fit(resume=False)

    config = tiny_config(max_steps=STEPS, gradient_accumulation=1, parallelism=parallelism)
    _run_two_processes(tmp_path / "double", config)

    reference, distributed = _final_state(tmp_path / "single"), _final_state(tmp_path / "double")
    assert reference.keys() == distributed.keys()
    worst = max(float((reference[k] - distributed[k]).abs().max()) for k in reference)
    assert worst < 1e-5, f"largest parameter difference {worst}"
    initial = build_model("tiny", seed=0).state_dict()
    assert max(float((reference[k] - initial[k]).abs().max()) for k in reference) > 1e-4  # it trained
    single_losses = [row["loss"] for row in read_log(tmp_path / "single" / "train_log.csv")]
    double_losses = [row["loss"] for row in read_log(tmp_path / "double" / "train_log.csv")]
    assert single_losses == pytest.approx(double_losses, abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_checkpoints_move_between_one_and_two_processes(tmp_path, parallelism):
    """Saved by 2 sharded processes, resumed by 1 (and the reverse): the uninterrupted result."""
    torch.set_num_threads(1)
    single = tiny_config(max_steps=STEPS, gradient_accumulation=2, ema_decay=0.9)
    double = tiny_config(max_steps=STEPS, gradient_accumulation=1, ema_decay=0.9, parallelism=parallelism)
    tiny_trainer(tmp_path / "straight", single).fit(resume=False)

    _run_two_processes(tmp_path / "two-then-one", double.replace(max_steps=STEPS - 1))
    tiny_trainer(tmp_path / "two-then-one", single).fit(resume=True)

    tiny_trainer(tmp_path / "one-then-two", single.replace(max_steps=STEPS - 1)).fit(resume=False)
    _run_two_processes(tmp_path / "one-then-two", double, resume=True)

    reference = _final_state(tmp_path / "straight")
    for name in ("two-then-one", "one-then-two"):
        state = _final_state(tmp_path / name)
        worst = max(float((reference[k] - state[k]).abs().max()) for k in reference)
        assert worst < 1e-5, f"{name}: largest parameter difference {worst}"
        ema_reference = read_safetensors(_final_dir(tmp_path / "straight") / "ema.safetensors")
        ema = read_safetensors(_final_dir(tmp_path / name) / "ema.safetensors")
        assert max(float((ema_reference[k] - ema[k]).abs().max()) for k in ema) < 1e-5
