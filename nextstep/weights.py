"""Streaming safetensors loading: shard by shard, tensor by tensor, straight into a module.

A checkpoint is one ``.safetensors`` file, or shards listed by a
``*.safetensors.index.json`` (``{"weight_map": {name: shard file}}``). Loading
reads the shard headers first (names, shapes, dtypes; no tensor data), checks
them against the module, then copies one tensor at a time into the module's own
parameters, casting on the way. Only one shard is open at a time and each
tensor is released before the next is read, so peak memory is the module plus
the largest tensor, not twice the checkpoint. A module built under
``torch.device("meta")`` is allocated here directly in the requested device and
dtype.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

INDEX_NAME = "model.safetensors.index.json"
SINGLE_FILE_NAME = "model.safetensors"

Rename = Callable[[str], "str | None"]


@dataclass(frozen=True)
class TensorInfo:
    """Where a checkpoint tensor lives and what it looks like, read from a shard header.

    Args:
        shard: the file holding it.
        shape: its shape.
        dtype: its safetensors dtype name (``F32``, ``BF16`` ...).
    """

    shard: Path
    shape: tuple[int, ...]
    dtype: str

    @property
    def is_floating_point(self) -> bool:
        """Whether the tensor holds floating-point values (``F16``, ``BF16``, ``F32`` ...)."""
        return self.dtype.startswith(("F", "BF"))


@dataclass
class LoadReport:
    """What a load did, by name.

    Args:
        loaded: module keys that received a tensor.
        missing: module keys no checkpoint tensor maps to.
        unexpected: names (after renaming) that the module does not have.
        mismatched: ``"name: expected (...), found (...)"`` for shape conflicts.
        skipped: checkpoint names the rename function dropped (returned None for).
    """

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """True when nothing is missing, unexpected or mis-shaped."""
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self) -> str:
        """The problems in one sentence (empty when `complete`), `key_problems`."""
        return key_problems(self.missing, self.unexpected, self.mismatched)


#: How many keys of each kind `key_problems` names before it counts the rest.
KEYS_SHOWN = 5


def key_problems(missing: list[str], unexpected: list[str], mismatched: list[str]) -> str:
    """Missing, unexpected and mis-shaped (``"name: expected (...), found (...)"``) keys in one sentence,
    naming the first `KEYS_SHOWN` of each kind and counting the rest (empty when there are none)."""
    def listed(keys: list[str], separator: str) -> str:
        more = f" and {len(keys) - KEYS_SHOWN} more" if len(keys) > KEYS_SHOWN else ""
        return f"[{separator.join(keys[:KEYS_SHOWN])}]{more}"

    problems = []
    if missing:
        problems.append(f"missing keys {listed([repr(key) for key in missing], ', ')}")
    if unexpected:
        problems.append(f"unexpected keys {listed([repr(key) for key in unexpected], ', ')}")
    if mismatched:
        problems.append(f"mis-shaped keys {listed(mismatched, '; ')}")
    return ", ".join(problems)


def tensor_to_save(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``tensor`` as a safetensors file takes it: detached, on the CPU, in ``dtype`` (default its own),
    contiguous and owning its memory (a view into a larger tensor, such as a packed projection of
    `nextstep.fast.packed_projections`, is copied: the format refuses tensors that share memory)."""
    tensor = tensor.detach().to(device="cpu", dtype=dtype or tensor.dtype).contiguous()
    return tensor.clone() if tensor.untyped_storage().nbytes() != tensor.nbytes else tensor


def checkpoint_shards(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint, in index order.

    Args:
        path: a ``.safetensors`` file, an ``*.index.json`` file, or a directory
            holding ``model.safetensors.index.json``, ``model.safetensors`` or
            other ``*.safetensors`` files.

    Raises:
        FileNotFoundError: naming what was looked for, or a shard listed in the
            index that is absent.
    """
    path = Path(path)
    if path.is_dir():
        if (path / INDEX_NAME).is_file():
            return _shards_from_index(path / INDEX_NAME)
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if len(indexes) == 1:
            return _shards_from_index(indexes[0])
        if (path / SINGLE_FILE_NAME).is_file():
            return [path / SINGLE_FILE_NAME]
        files = sorted(path.glob("*.safetensors"))
        if files:
            return files
        raise FileNotFoundError(
            f"expected {INDEX_NAME}, {SINGLE_FILE_NAME} or *.safetensors files in {path}, found none"
        )
    if path.name.endswith(".index.json") and path.is_file():
        return _shards_from_index(path)
    if path.suffix == ".safetensors" and path.is_file():
        return [path]
    raise FileNotFoundError(
        f"expected a .safetensors file, an index .json or a checkpoint directory at {path}, found nothing usable"
    )


def _shards_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{index} is not a safetensors index with a 'weight_map' ({error!r})") from error
    if not isinstance(weight_map, dict) or not weight_map:
        found = "an empty one" if weight_map in ({}, [], "", None) else f"a {type(weight_map).__name__}"
        raise ValueError(f"{index}: 'weight_map' must map each key to its shard file, found {found}")
    malformed = {key: name for key, name in weight_map.items() if not isinstance(name, str) or not name}
    if malformed:
        first = next(iter(malformed))
        raise ValueError(f"{index}: every 'weight_map' entry must name a shard file, found {first!r}: "
                         f"{malformed[first]!r}")
    shards = list(dict.fromkeys(index.parent / name for name in weight_map.values()))
    absent = [shard.name for shard in shards if not shard.is_file()]
    if absent:
        raise FileNotFoundError(f"shards {absent} listed in {index} are missing from {index.parent}")
    return shards


def read_checkpoint_index(path: str | Path) -> dict[str, TensorInfo]:
    """Names, shapes and dtypes of every tensor, read from the shard headers only.

    Args:
        path: as for `checkpoint_shards`.

    Raises:
        ValueError: for an unreadable shard or a name present in two shards.
    """
    infos: dict[str, TensorInfo] = {}
    for shard in checkpoint_shards(path):
        try:
            with safe_open(str(shard), framework="pt", device="cpu") as handle:
                for name in handle.keys():
                    tensor_slice = handle.get_slice(name)
                    if name in infos:
                        raise ValueError(f"tensor {name!r} appears in both {infos[name].shard.name} and {shard.name}")
                    infos[name] = TensorInfo(shard, tuple(tensor_slice.get_shape()), tensor_slice.get_dtype())
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{shard} is not a readable safetensors file ({error})") from error
    return infos


def iter_checkpoint(path: str | Path, *, rename: Rename | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` one at a time, one shard open at a time.

    Args:
        path: as for `checkpoint_shards`.
        rename: maps a checkpoint name to the name to yield, or None to skip it.
    """
    for shard in checkpoint_shards(path):
        with safe_open(str(shard), framework="pt", device="cpu") as handle:
            for name in handle.keys():
                target = rename(name) if rename is not None else name
                if target is not None:
                    yield target, handle.get_tensor(name)


def load_safetensors(
    module: nn.Module,
    path: str | Path,
    *,
    rename: Rename | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    strict: bool = True,
) -> LoadReport:
    """Load a (sharded) safetensors checkpoint into ``module``'s own tensors.

    Targets are the keys of ``module.state_dict()``; tied parameters count as
    loaded when any of their names is. Floating-point tensors are cast to the
    target dtype; meta tensors are allocated first.

    Args:
        module: the module to fill; may live on the meta device.
        path: as for `checkpoint_shards`.
        rename: maps a checkpoint name to a module key, or None to skip it
            (for example ``lambda k: k.removeprefix("model.")``).
        dtype: cast floating-point parameters and buffers to this dtype; None
            keeps the module's.
        device: move the module here (meta tensors are allocated here); None
            keeps the module's device, or the CPU for meta tensors.
        strict: raise on any missing, unexpected or mis-shaped key; when
            False, load what matches and report the rest (missing tensors of a
            meta-built module are then left uninitialised: initialise them).

    Returns:
        the `LoadReport`.

    Raises:
        ValueError: when ``strict`` and the checkpoint does not match, naming
            every missing, unexpected and mis-shaped key (with both shapes).
    """
    infos = read_checkpoint_index(path)
    report = LoadReport()
    sources: dict[str, str] = {}  # module key -> checkpoint name
    for name in infos:
        target = rename(name) if rename is not None else name
        if target is None:
            report.skipped.append(name)
        elif target in sources:
            raise ValueError(f"checkpoint tensors {sources[target]!r} and {name!r} both map to {target!r}")
        else:
            sources[target] = name

    expected = module.state_dict(keep_vars=True)
    mis_shaped = set()
    for target, name in sources.items():
        if target not in expected:
            report.unexpected.append(target)
        elif tuple(expected[target].shape) != infos[name].shape:
            mis_shaped.add(target)
            report.mismatched.append(
                f"{target}: expected {tuple(expected[target].shape)}, found {infos[name].shape}"
            )
        elif expected[target].is_floating_point() != infos[name].is_floating_point:
            mis_shaped.add(target)  # copying would round floats to integers (or the reverse) without a word
            report.mismatched.append(f"{target}: expected {expected[target].dtype} values, found {infos[name].dtype}")
    aliases: dict[int, list[str]] = {}
    for key, tensor in expected.items():
        aliases.setdefault(id(tensor), []).append(key)
    for names in aliases.values():
        if not any(key in sources for key in names):
            report.missing.extend(names)
    report.missing.sort()
    report.unexpected.sort()
    if strict and not report.complete:
        raise ValueError(f"checkpoint {path} does not match {type(module).__name__}: {report.describe()}")

    # Derived buffers first, so that checkpoint tensors overwrite them if they overlap.
    _reset_buffers(module, _allocate(module, device, dtype))
    if device is not None or dtype is not None:
        module.to(device=device, dtype=dtype)
    targets = module.state_dict(keep_vars=True)
    by_shard: dict[Path, list[tuple[str, str]]] = {}
    for target, name in sources.items():
        if target in targets and target not in mis_shaped:
            by_shard.setdefault(infos[name].shard, []).append((target, name))
    with torch.no_grad():
        for shard, pairs in by_shard.items():
            with safe_open(str(shard), framework="pt", device="cpu") as handle:
                for target, name in pairs:
                    tensor = handle.get_tensor(name)
                    targets[target].copy_(tensor)
                    del tensor
                    report.loaded.append(target)
    return report


def _allocate(module: nn.Module, device, dtype) -> list[nn.Module]:
    """Give meta tensors real (uninitialised) memory in ``dtype`` on ``device``.

    Tied tensors (one object under several names) stay tied. A buffer that no
    checkpoint holds (non-persistent) is left to the nearest module, itself or
    an ancestor, with a ``reset_buffers()`` method: the returned modules, whose
    ``reset_buffers()`` must run next.

    Raises:
        ValueError: for a non-persistent meta buffer that nothing can rebuild.
    """
    target_device = torch.device(device) if device is not None else torch.device("cpu")
    modules = dict(module.named_modules())
    replacements: dict[int, torch.Tensor] = {}
    rebuilders: dict[str, nn.Module] = {}
    unrecoverable: list[str] = []

    def allocate(tensor: torch.Tensor) -> torch.Tensor:
        cast = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        return torch.empty(tensor.shape, dtype=cast, device=target_device)

    def rebuilder_of(name: str) -> str | None:
        parts = name.split(".") if name else []
        for end in range(len(parts), -1, -1):
            candidate = ".".join(parts[:end])
            if hasattr(modules[candidate], "reset_buffers"):
                return candidate
        return None

    for name, submodule in modules.items():
        for key, parameter in list(submodule._parameters.items()):
            if parameter is not None and parameter.is_meta:
                if id(parameter) not in replacements:
                    replacements[id(parameter)] = nn.Parameter(allocate(parameter),
                                                               requires_grad=parameter.requires_grad)
                submodule._parameters[key] = replacements[id(parameter)]
        for key, buffer in list(submodule._buffers.items()):
            if buffer is None or not buffer.is_meta:
                continue
            owner = rebuilder_of(name)
            persistent = key not in submodule._non_persistent_buffers_set
            if owner is not None:
                rebuilders[owner] = modules[owner]
            if persistent or owner == name:
                if id(buffer) not in replacements:
                    replacements[id(buffer)] = allocate(buffer)
                submodule._buffers[key] = replacements[id(buffer)]  # filled by the checkpoint or reset_buffers
            elif owner is None:
                unrecoverable.append(f"{name}.{key}" if name else key)
            # else: left on the meta device for the ancestor's reset_buffers to rebuild
    if unrecoverable:
        raise ValueError(
            f"buffers {sorted(unrecoverable)} were on the meta device, are not saved in checkpoints and "
            "no module holding them has reset_buffers() to rebuild them; build the module on a real device"
        )
    return list(rebuilders.values())


def _reset_buffers(module: nn.Module, rebuilders: list[nn.Module]) -> None:
    """Run ``reset_buffers()`` where `_allocate` asked for it, then check that nothing is left on the meta device."""
    for rebuilder in rebuilders:
        rebuilder.reset_buffers()
    leftovers = [name for name, buffer in module.named_buffers() if buffer.is_meta]
    if leftovers:
        raise ValueError(f"buffers {leftovers} are still on the meta device after reset_buffers()")
