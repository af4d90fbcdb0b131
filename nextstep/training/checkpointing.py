"""Training checkpoints: atomic directories, the last K kept, exact resume.

A checkpoint is a directory ``step-XXXXXXXX`` holding:

- ``model.safetensors``: the full model state (all processes' shards gathered);
- ``optimizer.pt``: AdamW state keyed by parameter name (loaded with
  ``torch.load(weights_only=True)``), so DDP, FSDP and single-process runs can
  resume each other's checkpoints;
- ``ema.safetensors``: the weight average, when the run keeps one;
- ``trainer_state.json``: the step (which fixes the data position), bad-sample counts, the run's config;
- ``rng.pt``: every process's Python, NumPy and PyTorch generator states;
- whatever the task adds (for text-to-image, ``config.json`` and tokenizer
  files, which make the directory loadable with ``NextStep.from_pretrained``).

The directory is written under a hidden temporary name and renamed into place
only when complete, so a process killed while saving (even with SIGKILL)
leaves the previous checkpoints intact; leftovers are hidden names that
`CheckpointManager.latest` ignores and `CheckpointManager.remove_stale` deletes.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from nextstep.io import atomic_directory, moved_aside, read_json_object, remove_directory, restore_moved_aside
from nextstep.serialization import check_state_dict, read_safetensors
from nextstep.training.distributed import DistributedContext, full_tensor
from nextstep.training.ema import ExponentialMovingAverage

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
EMA_FILE = "ema.safetensors"
STATE_FILE = "trainer_state.json"
RNG_FILE = "rng.pt"
_NAME = re.compile(r"^step-(\d{8})$")
_CHUNK = 1 << 20

#: Called as ``hook(path, bytes_written, total_bytes)`` after every chunk a
#: checkpoint file receives. Tests use it to stop a process in the middle of a save.
WriteHook = Callable[[Path, int, int], None]


def checkpoint_name(step: int) -> str:
    """Directory name of the checkpoint after ``step`` optimiser steps."""
    return f"step-{step:08d}"


class CheckpointManager:
    """Saves and restores training state under one directory.

    Args:
        directory: where ``step-*`` directories live.
        keep_last: how many complete checkpoints to keep (older ones are deleted
            after a newer one is in place).
        context: the process's place in the job; only rank 0 writes, but every
            process takes part in gathering sharded state.
        write_hook: optional `WriteHook`.
    """

    def __init__(self, directory: str | Path, keep_last: int = 3,
                 context: DistributedContext | None = None, write_hook: WriteHook | None = None):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, found {keep_last!r}")
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.context = context or DistributedContext()
        self.write_hook = write_hook

    # ------------------------------------------------------------ listing
    def steps(self) -> list[int]:
        """Steps of the complete checkpoints on disk, ascending."""
        if not self.directory.is_dir():
            return []
        found = []
        for child in self.directory.iterdir():
            match = _NAME.match(child.name)
            if match and child.is_dir() and (child / STATE_FILE).is_file():
                found.append(int(match.group(1)))
        return sorted(found)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        steps = self.steps()
        return self.directory / checkpoint_name(steps[-1]) if steps else None

    def holds_checkpoint(self) -> bool:
        """Whether a run can resume from here: a complete checkpoint, or one that a crashed save left
        moved aside (`remove_stale` puts it back)."""
        return self.latest() is not None or bool(self._moved_aside_steps())

    def _moved_aside_steps(self) -> list[str]:
        """Checkpoint names a crashed save left moved aside (also as ``step-N.old-*``, an earlier naming)."""
        if not self.directory.is_dir():
            return []
        earlier = [child.name.partition(".old-")[0] for child in self.directory.glob("step-*.old-*")]
        return [name for name in [*moved_aside(self.directory), *earlier] if _NAME.match(name)]

    def remove_stale(self) -> list[Path]:
        """Delete hidden leftovers of interrupted saves; returns what was removed.

        A checkpoint that a save of the same step moved aside, and that a crash kept from
        being replaced, is put back first.
        """
        removed = []
        if self.context.is_main and self.directory.is_dir():
            for name in self._moved_aside_steps():
                if not restore_moved_aside(self.directory / name):
                    _restore_earlier_naming(self.directory / name)
            for child in self.directory.iterdir():
                staging = child.name.startswith(".step-")
                replaced = child.name.startswith("step-") and ".old-" in child.name
                if staging or replaced:
                    shutil.rmtree(child, ignore_errors=True)
                    removed.append(child)
        return removed

    # ------------------------------------------------------------- saving
    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        trainer_state: dict[str, Any],
        *,
        ema: ExponentialMovingAverage | None = None,
        write_extra: Callable[[Path], None] | None = None,
    ) -> Path:
        """Write the checkpoint of ``step``; every process must call this.

        Args:
            step: optimiser steps done.
            model: the unwrapped model (FSDP-sharded modules are gathered).
            optimizer: its optimiser.
            trainer_state: JSON-serialisable loop state (step, data position, ...).
            ema: the weight average, if the run keeps one.
            write_extra: called with the staging directory on rank 0 to add files.

        Returns:
            the checkpoint directory.
        """
        model_state = gather_model_state(model, self.context)
        optimizer_state = gather_optimizer_state(model, optimizer, self.context)
        ema_state = gather_average(ema, self.context) if ema is not None else None
        rng_states = self.context.gather_objects(capture_rng_state())
        target = self.directory / checkpoint_name(step)
        if self.context.is_main:
            with atomic_directory(target, markers=(STATE_FILE, MODEL_FILE)) as staging:
                self._write(staging / MODEL_FILE, save_safetensors_bytes(_unshared(model_state),
                                                                         metadata={"format": "pt"}))
                self._write(staging / OPTIMIZER_FILE, _torch_bytes(optimizer_state))
                if ema_state is not None:
                    self._write(staging / EMA_FILE, save_safetensors_bytes(_unshared(ema_state)))
                self._write(staging / RNG_FILE, _torch_bytes(rng_states))
                if write_extra is not None:
                    write_extra(staging)
                state = dict(trainer_state, step=step)
                # Written last: a directory with this file is complete.
                self._write(staging / STATE_FILE, (json.dumps(state, indent=2) + "\n").encode())
            self._prune()
        self.context.barrier()
        return target

    def _write(self, path: Path, data: bytes) -> None:
        with open(path, "wb") as handle:
            for start in range(0, max(len(data), 1), _CHUNK):
                handle.write(data[start:start + _CHUNK])
                if self.write_hook is not None:
                    handle.flush()
                    self.write_hook(path, min(start + _CHUNK, len(data)), len(data))

    def _prune(self) -> None:
        """Delete all but the last ``keep_last`` checkpoints, each renamed to a hidden name first (which
        `remove_stale` clears), so that one whose deletion stops halfway is not listed as a checkpoint."""
        for step in self.steps()[:-self.keep_last]:
            try:
                remove_directory(self.directory / checkpoint_name(step))
            except OSError as error:  # the new checkpoint is written: a pruning that fails costs only room
                warnings.warn(f"could not remove the old checkpoint {self.directory / checkpoint_name(step)} "
                              f"({error.strerror or error}); it stays", RuntimeWarning, stacklevel=2)

    # ------------------------------------------------------------ loading
    def read_state(self, path: str | Path) -> dict[str, Any]:
        """The trainer state saved with the checkpoint at ``path`` (its step, config, ...), read alone."""
        state_file = Path(path) / STATE_FILE
        if not state_file.is_file():
            raise FileNotFoundError(
                f"expected a complete checkpoint at {path} (with {STATE_FILE}), found none"
            )
        return read_json_object(state_file, "checkpoint trainer state")

    def load(
        self,
        path: str | Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        ema: ExponentialMovingAverage | None = None,
        restore_rng: bool = True,
        trainer_state: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Restore a checkpoint into live objects; every process must call this.

        Args:
            path: a checkpoint directory.
            model: the unwrapped model.
            optimizer: its optimiser, or None to load weights only.
            ema: the weight average to restore (the checkpoint must hold one).
            restore_rng: also restore this process's generator states.
            trainer_state: its `read_state`, when the caller read it already.

        Returns:
            the trainer state saved with the checkpoint.
        """
        path = Path(path)
        trainer_state = self.read_state(path) if trainer_state is None else trainer_state
        if ema is not None and not (path / EMA_FILE).is_file():
            raise FileNotFoundError(
                f"this run keeps an EMA but {path} has no {EMA_FILE}; set ema_decay to 0 "
                "or resume from a checkpoint written with an EMA"
            )
        # A sharded model receives the full state from rank 0; the other ranks read nothing.
        sharded = is_sharded(model)
        reads = self.context.is_main or not sharded
        model_state = read_safetensors(path / MODEL_FILE) if reads else {}
        optimizer_state = _read_torch(path / OPTIMIZER_FILE) if optimizer is not None and reads else {}
        rng_states = _read_torch(path / RNG_FILE) if restore_rng else None
        if sharded:  # each part checked as it loads (rank 0 reads, every rank receives)
            load_model_state(model, model_state, self.context, source=str(path / MODEL_FILE))
            if optimizer is not None:
                load_optimizer_state(model, optimizer, optimizer_state, self.context)
            if ema is not None:
                _load_ema(ema, path / EMA_FILE, self.context)
        else:  # every file read and checked before anything is changed: a refusal changes nothing
            check_state_dict(model.state_dict(), model_state, str(path / MODEL_FILE))
            if optimizer is not None:
                optimizer_state = indexed_optimizer_state(model, optimizer, optimizer_state)
            ema_state = read_safetensors(path / EMA_FILE) if ema is not None else None
            if ema_state is not None:
                ema.check_state(ema_state)
            model.load_state_dict(model_state, strict=True)
            if optimizer is not None:
                optimizer.load_state_dict(optimizer_state)
            if ema_state is not None:
                ema.load_state_dict(ema_state)
        if ema is None and (path / EMA_FILE).is_file() and self.context.is_main:
            warnings.warn(f"{path} holds a weight average that this run does not keep (ema_decay 0): it goes on "
                          "without it, and the model it writes is its last weights", UserWarning, stacklevel=2)
        if rng_states is not None and len(rng_states) == self.context.world_size:
            restore_rng_state(rng_states[self.context.rank])
        return trainer_state


def read_checkpoint_average(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The weight average a checkpoint holds, by parameter name.

    Raises:
        FileNotFoundError: the run kept no average.
    """
    path = Path(checkpoint) / EMA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"use_ema=True but {checkpoint} has no {EMA_FILE} (the run kept no average)")
    return read_safetensors(path)


# ----------------------------------------------------------------- model state
def is_sharded(model: nn.Module) -> bool:
    return any(hasattr(p, "full_tensor") for p in model.parameters())


def gather_model_state(model: nn.Module, context: DistributedContext) -> dict[str, torch.Tensor]:
    """The full model state on rank 0 (empty elsewhere for sharded models); CPU tensors."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], context: DistributedContext,
                     source: str) -> None:
    """Load a full model state (read from ``source``) into a plain or sharded model."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        if context.is_main:
            # DTensor shapes are the global shapes.
            check_state_dict(model.state_dict(), state, source)
        set_model_state_dict(model, state if context.is_main else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        return
    check_state_dict(model.state_dict(), state, source)
    model.load_state_dict(state, strict=True)


# ------------------------------------------------------------- optimiser state
def gather_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                           context: DistributedContext) -> dict[str, Any]:
    """Optimiser state keyed by parameter name, full tensors on CPU (rank 0 for sharded models)."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    names = {id(p): name for name, p in model.named_parameters()}
    raw = optimizer.state_dict()
    index_to_name = {}
    index = 0
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            index_to_name[index] = names[id(parameter)]
            index += 1
    state = {
        index_to_name[i]: {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in entry.items()}
        for i, entry in raw["state"].items()
    }
    groups = [dict(group, params=[index_to_name[i] for i in group["params"]]) for group in raw["param_groups"]]
    return {"state": state, "param_groups": groups}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                         context: DistributedContext) -> None:
    """Inverse of `gather_optimizer_state`."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state if context.is_main else {},
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        return
    optimizer.load_state_dict(indexed_optimizer_state(model, optimizer, state))


def indexed_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                            state: dict[str, Any]) -> dict[str, Any]:
    """A state of `gather_optimizer_state` (keyed by parameter name) as ``optimizer.load_state_dict`` takes it
    (keyed by index) for a plain model; ``ValueError`` when its parameters or groups are not the optimiser's."""
    names = {id(p): name for name, p in model.named_parameters()}
    name_to_index = {}
    index = 0
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            name_to_index[names[id(parameter)]] = index
            index += 1
    saved_groups = state.get("param_groups", [])
    saved_names = [name for group in saved_groups for name in group["params"]]
    if sorted(saved_names) != sorted(name_to_index):
        missing = sorted(set(name_to_index) - set(saved_names))
        unexpected = sorted(set(saved_names) - set(name_to_index))
        raise ValueError(
            f"optimiser state does not match the model's trainable parameters: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    saved_sizes = [len(g["params"]) for g in saved_groups]
    sizes = [len(g["params"]) for g in optimizer.param_groups]
    if saved_sizes != sizes:
        raise ValueError(f"optimiser parameter groups differ from the checkpoint's: it holds groups of {saved_sizes} "
                         f"parameters, this run {sizes}")
    return {
        "state": {name_to_index[name]: entry for name, entry in state["state"].items()},
        "param_groups": [dict(group, params=[name_to_index[n] for n in group["params"]])
                         for group in saved_groups],
    }


def gather_average(ema: ExponentialMovingAverage, context: DistributedContext) -> dict[str, torch.Tensor] | None:
    """The average's whole tensors on CPU on rank 0 (None on the other ranks), gathered one tensor at a time:
    besides its shards, a process holds one whole tensor at most."""
    state = {}
    for name, tensor in ema.state_dict().items():
        whole = full_tensor(tensor)  # a collective for a sharded average: every rank takes part
        if context.is_main:
            state[name] = whole.detach().cpu()
        del whole
    return state if context.is_main else None


def _is_sharded_average(ema: ExponentialMovingAverage) -> bool:
    return any(hasattr(tensor, "full_tensor") for tensor in ema.shadow.values())


def _load_ema(ema: ExponentialMovingAverage, path: Path, context: DistributedContext) -> None:
    """Load the average saved at ``path`` into ``ema``. A sharded average is read by rank 0 alone, which
    sends each tensor to the shards of every rank; a file it cannot read or that does not fit is refused
    on every rank (none waits for the others)."""
    if not _is_sharded_average(ema):
        ema.load_state_dict(read_safetensors(path))
        return
    import torch.distributed as dist
    from torch.distributed.tensor import distribute_tensor

    problem, state = None, {}
    if context.is_main:
        try:
            state = read_safetensors(path)
            ema.check_state(state)  # as the unsharded path checks it: names and whole shapes
        except (ValueError, OSError) as error:
            problem = f"{type(error).__name__}: {error}"
    problem = context.broadcast_object(problem)
    if problem is not None:
        raise ValueError(f"cannot resume the weight average from {path}: {problem}")
    for name, shadow in ema.shadow.items():
        if context.is_main:
            value = state[name].to(shadow.device, shadow.dtype)
        else:  # filled from rank 0
            value = torch.empty(tuple(shadow.shape), dtype=shadow.dtype, device=shadow.device)
        if hasattr(shadow, "full_tensor"):
            shadow.copy_(distribute_tensor(value, shadow.device_mesh, shadow.placements))  # from rank 0
        else:
            if context.is_distributed:
                dist.broadcast(value, src=0)
            shadow.copy_(value)


# ------------------------------------------------------------------ RNG state
def capture_rng_state() -> dict[str, Any]:
    """This process's Python, NumPy, PyTorch CPU (and CUDA) generator states."""
    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        # Plain lists and numbers: the file is read back with weights_only=True.
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(position), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------ byte I/O
def _torch_bytes(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _read_torch(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"expected {path.name} in checkpoint {path.parent}, found nothing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file
        raise ValueError(f"{path} is not a readable checkpoint file ({error})") from error


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, copying any that share memory (safetensors refuses aliases)."""
    seen: set[int] = set()
    out = {}
    for name, tensor in state.items():
        tensor = tensor.detach().cpu().contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[name] = tensor
    return out


def _restore_earlier_naming(path: Path) -> None:
    """Put back ``<path>.old-*``, where saves once moved a checkpoint aside, when ``path`` is missing."""
    backups = sorted(path.parent.glob(f"{path.name}.old-*"), key=lambda backup: backup.stat().st_mtime)
    if backups and not path.exists():
        os.replace(backups[-1], path)
