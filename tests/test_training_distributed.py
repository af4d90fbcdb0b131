"""Two gloo processes on CPU train the same model as one process with the same global batch."""

import time

import pytest
import torch
import torch.multiprocessing as mp
from training_helpers import (
    distributed_worker,
    free_port,
    recipe_worker,
    shared_folder_worker,
    tiny_config,
    tiny_trainer,
)

from nextstep import build_model
from nextstep.serialization import read_safetensors
from nextstep.training.logging import read_log

STEPS = 3


def _run_two_processes(output_dir, config, timeout_s: float = 120.0, resume: bool = False) -> None:
    _join_two_processes(distributed_worker, (2, free_port(), str(output_dir), config.to_dict(), resume), timeout_s)


def _join_two_processes(worker, args: tuple, timeout_s: float) -> None:
    context = mp.start_processes(worker, args=args, nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the 2-process run did not finish within {timeout_s} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


def _final_dir(output_dir, step: int = STEPS):
    return output_dir / "checkpoints" / f"step-{step:08d}"


def _final_state(output_dir, step: int = STEPS):
    return read_safetensors(_final_dir(output_dir, step) / "model.safetensors")


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
    single_log = read_log(tmp_path / "single" / "train_log.csv")
    double_log = read_log(tmp_path / "double" / "train_log.csv")
    for column in ("loss", "text_loss", "image_loss", "grad_norm"):  # the gradient itself, before clipping
        assert [row[column] for row in single_log] == pytest.approx([row[column] for row in double_log], rel=1e-5)


def test_two_processes_on_one_machine_share_a_folder(tmp_path):
    _join_two_processes(shared_folder_worker, (2, free_port(), str(tmp_path / "cache")), 60.0)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["checked-by-1"]  # the marker is gone


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


def test_only_rank_0_holds_the_whole_average_of_a_sharded_run(tmp_path):
    """Rank 0 gathers the average to write it and reads it to resume; the other ranks hold their shards."""
    import json

    from training_helpers import average_reads_worker

    torch.set_num_threads(1)
    config = tiny_config(max_steps=1, checkpoint_every=1, ema_decay=0.9, parallelism="fsdp")
    _join_two_processes(average_reads_worker, (2, free_port(), str(tmp_path), config.to_dict()), 120.0)
    first, second = (json.loads((tmp_path / f"reads-{rank}.json").read_text()) for rank in (0, 1))
    assert first["gathered"] and "ema.safetensors" in first["read"]
    assert not second["gathered"] and "ema.safetensors" not in second["read"]
    assert first["restored"] and second["restored"]


def test_a_damaged_average_is_refused_on_every_rank_of_a_sharded_run(tmp_path):
    """Rank 0 alone reads the average; when it cannot, every rank raises instead of waiting for it."""
    from training_helpers import damaged_average_worker

    torch.set_num_threads(1)
    config = tiny_config(max_steps=1, checkpoint_every=1, ema_decay=0.9, parallelism="fsdp")
    _join_two_processes(damaged_average_worker, (2, free_port(), str(tmp_path), config.to_dict()), 120.0)
    for rank in (0, 1):
        assert "cannot resume the weight average from" in (tmp_path / f"resume-{rank}.txt").read_text()


SHARDED_TRAIN = {"max_steps": 2, "micro_batch_size": 2, "warmup_steps": 1, "learning_rate": 1e-3,
                 "checkpoint_every": 1000, "parallelism": "fsdp", "ema_decay": 0.5}


@pytest.mark.slow
def test_a_sharded_recipe_writes_its_averaged_model_as_the_last_checkpoint_exports_it(tmp_path):
    from nextstep import NextStep
    from nextstep.training.export import export_model

    recipe = {"model": "tiny", "train": SHARDED_TRAIN,
              "data": {"datasets": [{"type": "shapes", "num_samples": 16, "size": 32}], "resolution": 32}}
    _join_two_processes(recipe_worker, (2, free_port(), str(tmp_path / "run"), recipe, "model"), 180.0)
    written = NextStep.from_pretrained(tmp_path / "run" / "model").state_dict()
    export_model(tmp_path / "run", tmp_path / "exported", use_ema=True)
    exported = NextStep.from_pretrained(tmp_path / "exported").state_dict()
    assert written.keys() == exported.keys()
    assert all(torch.equal(written[name], exported[name]) for name in written)
    raw = _final_state(tmp_path / "run", step=2)
    assert any(not torch.equal(raw[name], written[name]) for name in raw)  # the average, not the last weights


@pytest.mark.slow
def test_a_sharded_tokenizer_recipe_writes_and_evaluates_its_tokenizer(tmp_path):
    from nextstep.tokenizers.vae_checkpoints import load_flux_vae

    recipe = {"tokenizer": "tiny", "perceptual_network": "none", "loss": {"perceptual_weight": 0.0},
              "tokenizer_config": {"ch": 8, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 1, "norm_groups": 4},
              "evaluation_crops": 2, "evaluation_size": 32, "train_encoder": False, "train": SHARDED_TRAIN,
              "data": {"datasets": [{"type": "photo_crops", "num_samples": 8, "size": 32}], "resolution": 32}}
    _join_two_processes(recipe_worker, (2, free_port(), str(tmp_path / "run"), recipe, "tokenizer"), 180.0)
    written = load_flux_vae(tmp_path / "run" / "tokenizer").state_dict()
    raw = _final_state(tmp_path / "run", step=2)
    average = read_safetensors(_final_dir(tmp_path / "run", step=2) / "ema.safetensors")
    assert average and all(name.startswith("decoder.") for name in average)
    for name, tensor in written.items():
        assert torch.equal(tensor, average[name] if name in average else raw[name]), name
    assert (tmp_path / "run" / "eval" / "report.json").is_file()


def test_the_collectives_average_add_and_gather_in_rank_order(tmp_path):
    import json

    from training_helpers import collectives_worker

    _join_two_processes(collectives_worker, (2, free_port(), str(tmp_path)), 60.0)
    for rank in range(2):
        mean, total, gathered = json.loads((tmp_path / f"{rank}.json").read_text())
        assert mean == [0.5, 2.0] and total == [1.0] and gathered == [0, 1]


def test_the_main_process_is_global_rank_0_not_each_machine_s_first():
    from nextstep.training import DistributedContext

    assert DistributedContext(rank=0, world_size=4, local_rank=0).is_main
    assert not DistributedContext(rank=2, world_size=4, local_rank=0).is_main
    assert not DistributedContext(rank=1, world_size=4, local_rank=1).is_main


def test_a_single_process_reads_its_ranks_from_the_environment(monkeypatch):
    from nextstep.training import DistributedContext

    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    context = DistributedContext.from_environment(device="cpu")
    assert (context.rank, context.local_rank, context.world_size) == (3, 1, 1)
    assert context.device == torch.device("cpu") and not context.is_distributed


def test_skipping_the_gradient_sync_turns_it_back_on_afterwards():
    from nextstep.training import DistributedContext

    class Sharded(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = []

        def set_requires_gradient_sync(self, value):
            self.calls.append(value)

    wrapped = Sharded()
    with pytest.raises(RuntimeError, match="micro-step"):
        with DistributedContext().no_gradient_sync(wrapped):
            assert wrapped.calls == [False]
            raise RuntimeError("micro-step")
    assert wrapped.calls == [False, True]


class _TwoRanks:
    """What `torch.distributed` does for a process of a 2-process gloo job whose peer holds ``peer``."""

    def __init__(self, peer):
        self.peer, self.barriers = peer, 0

    def all_reduce(self, tensor):
        tensor += torch.tensor(self.peer, dtype=tensor.dtype)

    def barrier(self):
        self.barriers += 1

    def get_backend(self):
        return "gloo"


def test_the_collectives_keep_double_precision_and_wait_at_the_barrier(monkeypatch):
    import nextstep.training.distributed as distributed
    from nextstep.training import DistributedContext

    peer = _TwoRanks([1.1, 3.3])
    for name in ("all_reduce", "barrier", "get_backend"):
        monkeypatch.setattr(distributed.dist, name, getattr(peer, name))
    context = DistributedContext(rank=0, world_size=2)
    assert context.mean([0.1, 0.7]) == [(0.1 + 1.1) / 2, (0.7 + 3.3) / 2]
    assert context.sum([0.1, 0.7]) == [0.1 + 1.1, 0.7 + 3.3]
    context.barrier()
    assert peer.barriers == 1
    DistributedContext().barrier()  # a single process waits for nobody
    assert peer.barriers == 1


def test_collectives_run_on_the_process_s_device_under_nccl_and_on_the_cpu_otherwise(monkeypatch):
    import nextstep.training.distributed as distributed
    from nextstep.training import DistributedContext

    context = DistributedContext(rank=1, world_size=2, local_rank=1, device=torch.device("cuda", 1))
    monkeypatch.setattr(distributed.dist, "get_backend", lambda: "nccl")
    assert context._collective_device() == torch.device("cuda", 1)
    monkeypatch.setattr(distributed.dist, "get_backend", lambda: "gloo")
    assert context._collective_device() == torch.device("cpu")


def test_a_process_waits_for_the_main_process_s_marker_to_appear(tmp_path):
    import threading

    from nextstep.training import DistributedContext

    folder = tmp_path / "cache"
    folder.mkdir()
    marker = ".shared-check-late"

    class Second(DistributedContext):
        def broadcast_object(self, value):
            return marker, None

        def gather_objects(self, value):
            return [True, value]

    late = threading.Timer(1.0, (folder / marker).write_text, args=("",))
    late.start()
    try:
        Second(rank=1, world_size=2).check_shared_folder(folder, "data.latent_cache", wait_seconds=60.0)
    finally:
        late.cancel()
        late.join()
    assert (folder / marker).exists()  # the main process removes it, not this one
