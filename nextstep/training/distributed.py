"""Process groups, model wrapping (DDP or FSDP2) and collectives for ``torchrun`` launches.

A single process is a world of size 1: every helper here then does nothing,
so the training loop has one code path.
"""

from __future__ import annotations

import datetime
import os
import time
import uuid
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistributedContext:
    """Where this process sits in the job.

    Attributes:
        rank: global index of this process.
        world_size: number of processes.
        local_rank: index on this machine (selects the GPU).
        device: the device this process trains on.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on the process that writes logs, samples and checkpoints."""
        return self.rank == 0

    # ------------------------------------------------------------ set-up
    @classmethod
    def from_environment(cls, device: str | None = None, backend: str | None = None,
                         timeout_s: float = 1800.0) -> "DistributedContext":
        """Join the process group described by ``torchrun``'s variables, if any.

        Without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) this is a single process
        and no group is created. Otherwise the backend is NCCL when CUDA is
        available and gloo elsewhere, unless ``backend`` says otherwise.

        Args:
            device: ``cuda``, ``cpu`` or None (CUDA when available).
            backend: process-group backend override.
            timeout_s: how long a collective may wait before the job fails.
        """
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device_type = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
            resolved = torch.device("cuda", local_rank)
        else:
            resolved = torch.device(device_type)
        if world_size > 1 and not dist.is_initialized():
            backend = backend or ("nccl" if resolved.type == "cuda" else "gloo")
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        return cls(rank, world_size, local_rank, resolved)

    @classmethod
    def initialize(cls, rank: int, world_size: int, init_method: str, *, backend: str = "gloo",
                   device: str = "cpu", timeout_s: float = 120.0) -> "DistributedContext":
        """Join a process group explicitly (for spawned workers and tests).

        Args:
            rank: this process's rank.
            world_size: number of processes.
            init_method: rendezvous address, e.g. ``tcp://127.0.0.1:29500``.
            backend: ``gloo`` (CPU) or ``nccl`` (CUDA).
            device: device type of this process.
            timeout_s: how long a collective may wait before failing.
        """
        if world_size > 1 and not dist.is_initialized():
            dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        resolved = torch.device("cuda", rank) if device == "cuda" else torch.device(device)
        return cls(rank, world_size, rank, resolved)

    def shutdown(self) -> None:
        """Leave the process group (call once at the end of the job)."""
        if self.is_distributed and dist.is_initialized():
            dist.destroy_process_group()

    # ------------------------------------------------------------ wrapping
    def wrap(self, model: nn.Module, parallelism: str, shard_units: list[nn.Module] | None = None,
             ignored: set[nn.Parameter] | None = None) -> nn.Module:
        """The module to call for training: ``model`` itself, DDP around it, or sharded in place.

        Args:
            model: the model, already on ``device``.
            parallelism: ``ddp`` or ``fsdp``.
            shard_units: for FSDP, submodules sharded as their own units (each
                gathered just before it runs), e.g. the transformer layers.
            ignored: for FSDP, parameters left whole on every process (frozen
                parts used outside ``forward``, such as an image tokenizer).
        """
        if not self.is_distributed:
            return model
        if parallelism == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            return DistributedDataParallel(model, device_ids=device_ids)
        if parallelism == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for unit in shard_units or []:
                fully_shard(unit)
            fully_shard(model, ignored_params=ignored or None)
            return model
        raise ValueError(f"parallelism must be 'ddp' or 'fsdp', found {parallelism!r}")

    @contextmanager
    def no_gradient_sync(self, wrapped: nn.Module) -> Iterator[None]:
        """Skip the gradient all-reduce of the enclosed backward (accumulation micro-steps)."""
        if hasattr(wrapped, "no_sync"):
            with wrapped.no_sync():
                yield
        elif hasattr(wrapped, "set_requires_gradient_sync"):
            wrapped.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                wrapped.set_requires_gradient_sync(True)
        else:
            with nullcontext():
                yield

    # ---------------------------------------------------------- collectives
    def mean(self, values: list[float]) -> list[float]:
        """Average a few numbers over all processes."""
        if not self.is_distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(tensor)
        return (tensor / self.world_size).tolist()

    def sum(self, values: list[float]) -> list[float]:
        """Add a few numbers over all processes."""
        if not self.is_distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(tensor)
        return tensor.tolist()

    def gather_objects(self, value: Any) -> list[Any]:
        """Every process's ``value``, in rank order (on every process)."""
        if not self.is_distributed:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's ``value`` on every process."""
        if not self.is_distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()

    def check_shared_folder(self, folder: str | Path, setting: str, wait_seconds: float = 30.0) -> None:
        """Raise ``ValueError`` on every process unless every process sees ``folder`` as the one the main
        process writes to (a folder one process fills and the others read, such as a latent cache).

        The main process writes a marker file there; each process looks for it (up to ``wait_seconds``,
        for network file systems that show new files late) and all learn who could not see it.
        ``setting`` names the setting that chose the folder.
        """
        if not self.is_distributed:
            return
        folder = Path(folder)
        marker, failure = None, None
        if self.is_main:
            try:
                folder.mkdir(parents=True, exist_ok=True)
                marker = f".shared-check-{uuid.uuid4().hex}"
                (folder / marker).write_text("")
            except OSError as error:  # every process learns of it, rather than waiting in the collective
                failure = f"{setting} {str(folder)!r} cannot be written by the main process: {error}"
        marker, failure = self.broadcast_object((marker, failure))
        if failure is not None:
            raise ValueError(failure)

        def visible() -> bool:
            try:
                return (folder / marker).exists()
            except OSError:  # a folder this process may not enter counts as unseen
                return False

        try:
            deadline = time.monotonic() + wait_seconds
            while not visible() and time.monotonic() < deadline:
                time.sleep(0.5)
            seen = self.gather_objects(visible())
        finally:
            if self.is_main:
                (folder / marker).unlink(missing_ok=True)
        blind = [rank for rank, saw in enumerate(seen) if not saw]
        if blind:
            raise ValueError(f"{setting} {str(folder)!r} is not one folder for every process: process(es) {blind} "
                             "cannot see a file the main process wrote there; put it on a file system that every "
                             "node shares")

    def _collective_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A whole tensor from a possibly sharded one (a collective for FSDP ``DTensor`` values)."""
    if hasattr(tensor, "full_tensor"):
        return tensor.full_tensor()
    return tensor
