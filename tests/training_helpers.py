"""Shared pieces of the training tests: tiny runs and a worker for spawned processes."""

from __future__ import annotations

import socket
from pathlib import Path

import torch

from nextstep import build_model
from nextstep.training import AspectRatioBuckets, TextToImageTask, TrainConfig, Trainer, TrainingData
from nextstep.training.data import ShapesConfig, ShapesDataset


def tiny_config(**changes) -> TrainConfig:
    base = dict(max_steps=4, micro_batch_size=2, warmup_steps=2, learning_rate=1e-3, log_every=1,
                checkpoint_every=1000, keep_last=2)
    base.update(changes)
    return TrainConfig(**base)


def shapes_data(num_samples: int = 64, size: int = 32) -> TrainingData:
    return TrainingData(ShapesDataset(ShapesConfig(num_samples=num_samples, size=size)),
                        AspectRatioBuckets(size, multi_aspect=False))


def tiny_trainer(output_dir, config: TrainConfig, context=None, **kwargs) -> Trainer:
    model = build_model("tiny", seed=0)
    return Trainer(TextToImageTask.from_train_config(model, config), shapes_data(), config, output_dir, context=context,
                   show_progress=False, **kwargs)


def free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def gloo_context(rank: int, world_size: int, port: int):
    """This process's `DistributedContext` of a CPU/gloo job on this machine."""
    from nextstep.training import DistributedContext

    return DistributedContext.initialize(rank, world_size, f"tcp://127.0.0.1:{port}", backend="gloo", timeout_s=60)


def folder_of_two_shapes(folder: Path) -> None:
    """Eight images in ``folder``, square (32 x 32) and wide (64 x 16) in turn, with captions."""
    from PIL import Image

    folder.mkdir()
    for index in range(8):
        size = (32, 32) if index % 2 == 0 else (64, 16)  # (width, height)
        Image.new("RGB", size, (index * 30, 0, 0)).save(folder / f"img{index}.png")
        (folder / f"img{index}.txt").write_text(f"picture {index}")


def distributed_worker(rank: int, world_size: int, port: int, output_dir: str, config_dict: dict,
                       resume: bool = False) -> None:
    """One process of a CPU/gloo job: train the tiny model; rank 0 writes the final checkpoint."""
    torch.set_num_threads(1)
    context = gloo_context(rank, world_size, port)
    try:
        trainer = tiny_trainer(Path(output_dir), TrainConfig.from_dict(config_dict), context=context)
        trainer.fit(resume=resume)
    finally:
        context.shutdown()


def shared_folder_worker(rank: int, world_size: int, port: int, folder: str) -> None:
    """One process of a CPU/gloo job checking that a folder is shared; rank 1 writes what it saw."""
    context = gloo_context(rank, world_size, port)
    try:
        context.check_shared_folder(folder, "data.latent_cache", wait_seconds=5.0)
        if rank == 1:
            Path(folder, "checked-by-1").write_text("ok")
    finally:
        context.shutdown()


def recipe_worker(rank: int, world_size: int, port: int, output_dir: str, recipe_dict: dict, kind: str) -> None:
    """One process of a `torchrun`-style job (its rank in the environment) running a model or tokenizer recipe."""
    import os

    os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if kind == "model":
        from nextstep.training.recipe import RecipeConfig, run_recipe

        run_recipe(RecipeConfig.from_dict(recipe_dict), output_dir, resume=False, show_progress=False)
    else:
        from nextstep.training.tokenizer_recipe import TokenizerRecipeConfig, run_tokenizer_recipe

        run_tokenizer_recipe(TokenizerRecipeConfig.from_dict(recipe_dict), output_dir, resume=False,
                             show_progress=False)


def average_reads_worker(rank: int, world_size: int, port: int, output_dir: str, config_dict: dict) -> None:
    """One process of a sharded CPU/gloo job with a weight average: train and checkpoint, then resume; each
    rank writes ``reads-<rank>.json``: whether it gathered the whole average and which files it read."""
    import json

    import nextstep.training.checkpointing as checkpointing

    torch.set_num_threads(1)
    context = gloo_context(rank, world_size, port)
    try:
        trainer = tiny_trainer(Path(output_dir), TrainConfig.from_dict(config_dict), context=context)
        trainer.fit(resume=False)
        gathered = checkpointing.gather_average(trainer.ema, context)
        read, reader = [], checkpointing.read_safetensors

        def reading(path, *args, **kwargs):
            read.append(Path(path).name)
            return reader(path, *args, **kwargs)

        checkpointing.read_safetensors = reading
        before = {name: checkpointing.full_tensor(tensor).clone() for name, tensor in trainer.ema.shadow.items()}
        for tensor in trainer.ema.shadow.values():
            tensor.zero_()
        trainer.resume()
        restored = all(torch.equal(checkpointing.full_tensor(tensor), before[name])
                       for name, tensor in trainer.ema.shadow.items())
        Path(output_dir, f"reads-{rank}.json").write_text(json.dumps(
            {"gathered": gathered is not None, "read": read, "restored": restored}))
    finally:
        context.shutdown()


def damaged_average_worker(rank: int, world_size: int, port: int, output_dir: str, config_dict: dict) -> None:
    """One process of a sharded CPU/gloo job whose checkpointed average is then damaged: each rank writes
    what resuming raised into ``resume-<rank>.txt``."""
    torch.set_num_threads(1)
    context = gloo_context(rank, world_size, port)
    try:
        trainer = tiny_trainer(Path(output_dir), TrainConfig.from_dict(config_dict), context=context)
        trainer.fit(resume=False)
        if context.is_main:
            (trainer.checkpoints.latest() / "ema.safetensors").write_bytes(b"not a safetensors file")
        context.barrier()
        try:
            trainer.resume()
            outcome = "resumed"
        except ValueError as error:
            outcome = str(error)
        Path(output_dir, f"resume-{rank}.txt").write_text(outcome)
    finally:
        context.shutdown()


def collectives_worker(rank: int, world_size: int, port: int, out: str) -> None:
    """One process of a CPU/gloo job writing ``<rank>.json``: the mean of [rank, 2], the sum of [rank] and
    the gathered ranks."""
    import json

    context = gloo_context(rank, world_size, port)
    try:
        result = (context.mean([float(rank), 2.0]), context.sum([float(rank)]), context.gather_objects(rank))
        Path(out, f"{rank}.json").write_text(json.dumps(result))
    finally:
        context.shutdown()
