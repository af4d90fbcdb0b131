"""When the library's Triton kernels run, and Triton imported only when one does.

The library imports and works without Triton and without a GPU. A fused
operation (for example `nextstep.kernels.adaln_modulation.layer_norm_modulate`)
runs its Triton kernel when `triton_enabled` says so for its tensors, and its
eager PyTorch reference otherwise:

- on CUDA tensors, when ``import triton`` works;
- on CPU tensors only under Triton's interpreter (``TRITON_INTERPRET=1`` set
  before Triton is first imported, and a Triton whose interpreter works with
  the installed NumPy, see `interpreter_active`), which is how
  the tests check every kernel against its reference on machines without a GPU,
  or inside `nextstep.kernels.target_compile.compile_for_target`, which
  compiles the kernels for a GPU instead of running them;
- never when the environment variable ``NEXTSTEP_DISABLE_TRITON`` is set to
  anything but the empty string, ``0``, ``false``, ``no`` or ``off`` (in any case);
- never again for an operation whose kernel failed to build or launch
  (`dispatch` warns once with a `KernelFallbackWarning` and uses the reference).
"""

from __future__ import annotations

import functools
import importlib
import itertools
import os
import sys
import warnings
from contextlib import contextmanager
from types import ModuleType
from typing import Any, Callable, Iterator

import torch

#: Environment variable that turns every Triton kernel off (the references run instead).
DISABLE_VARIABLE = "NEXTSTEP_DISABLE_TRITON"

_TRUE = ("1", "true", "yes", "on")

#: Operations whose kernel failed, with the error; they use their reference from then on.
FAILED_KERNELS: dict[str, str] = {}

#: The GPU architecture (90 for sm_90) that kernels on CPU tensors are compiled for, not run; None: they
#: are not (`set_compiling_for`).
_compiling_for: int | None = None

#: Whether the kernels that take part launch as dependent launches now (`dependent_launches`).
_dependent_launches = False


class KernelFallbackWarning(RuntimeWarning):
    """A Triton kernel failed to build or launch; its eager reference runs instead."""


@functools.cache
def _import_triton() -> ModuleType | None:
    try:
        return importlib.import_module("triton")
    except Exception:  # ImportError, or a broken installation that fails while importing
        return None


def triton_module() -> ModuleType:
    """The ``triton`` module; ``RuntimeError`` with the install command when it is missing."""
    triton = _import_triton()
    if triton is None:
        raise RuntimeError(
            "this operation needs Triton, which is not importable; install it with "
            "`pip install triton` (or the `gpu` extra: `pip install nextstep[gpu]`)"
        )
    return triton


def triton_available() -> bool:
    """Whether ``import triton`` works (checked once, on first call)."""
    return _import_triton() is not None


def interpreter_enabled() -> bool:
    """Whether Triton's CPU interpreter is on (``TRITON_INTERPRET`` set to a true value)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


def interpreter_active() -> bool:
    """Whether kernels can run on CPU tensors now: the interpreter is on and Triton was imported with it.

    Triton decides at import time whether its own library functions are
    interpreted, so turning ``TRITON_INTERPRET`` on after Triton was imported is
    not enough.
    """
    if not interpreter_enabled():
        return False
    triton = _import_triton()
    if triton is None:
        return False
    problem = interpreter_problem()
    if problem is not None:
        _warn_once(problem + "; the kernels' PyTorch references run instead")
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(triton.language.standard.sum, InterpretedFunction)


def _release(version: str) -> tuple[int, ...]:
    """``"3.6.0+git1234"`` -> ``(3, 6, 0)``."""
    numbers = []
    for part in version.split("+")[0].split(".")[:3]:
        digits = "".join(itertools.takewhile(str.isdigit, part))
        numbers.append(int(digits or 0))
    return tuple(numbers)


@functools.cache
def interpreter_problem(triton_version: str | None = None, numpy_version: str | None = None) -> str | None:
    """Why Triton's interpreter cannot run the library's kernels with these releases (default: the installed
    ones), or None when it can (checked once per pair of arguments).

    Triton's interpreter before 3.7 turns one-element arrays into Python integers, which NumPy 2.4 refuses,
    so every kernel whose loop bound is an argument fails there.
    """
    if triton_version is None:
        triton = _import_triton()
        if triton is None:
            return None
        triton_version = triton.__version__
    if numpy_version is None:
        try:
            import numpy
        except ImportError:  # the interpreter then says itself what it misses
            return None
        numpy_version = numpy.__version__
    if _release(triton_version) < (3, 7) and _release(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s interpreter cannot run the kernels with NumPy {numpy_version} (it "
                "needs NumPy < 2.4, or Triton >= 3.7)")
    return None


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, KernelFallbackWarning, stacklevel=3)


def set_compiling_for(arch: int | None) -> int | None:
    """Compile kernels launched on CPU tensors for ``arch`` and not run them (None: back to normal);
    returns the previous setting.

    `nextstep.kernels.target_compile.compile_for_target` does this together
    with pointing Triton at the target; on its own it only routes fused
    operations on CPU tensors to their kernels.
    """
    global _compiling_for
    previous, _compiling_for = _compiling_for, None if arch is None else int(arch)
    return previous


@functools.cache
def dependent_launch_available() -> bool:
    """Whether the installed Triton launches kernels as programmatic dependent launches (its ``launch_pdl``
    option and ``gdc_wait``): a kernel that may start while the kernel ahead of it in the stream finishes
    (Hopper and later)."""
    if grid_dependency_functions()[0] is None:  # an older Triton
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except Exception:  # no NVIDIA backend
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


@contextmanager
def dependent_launches(on: bool = True) -> Iterator[None]:
    """Inside, the kernels that take part are launched as programmatic dependent launches where they can be.

    Such a kernel's programs start while the kernel ahead of them finishes:
    each tells the next kernel it may start, does what reads nothing that
    kernel writes (asking L2 for weights), then waits for the kernel ahead
    (``gdc_wait``) before anything else. The launch gaps between the many
    small kernels of a decode step overlap. Taking part: `add_rms_norm`,
    `skinny_linear`, `rotate_into_cache` and `swiglu`
    (`nextstep.fast.fused_decode.FusedDecodeStack` with ``dependent_launches=True``).
    Nothing changes where `dependent_launch_available` is False or under
    Triton's interpreter.
    """
    global _dependent_launches
    previous, _dependent_launches = _dependent_launches, bool(on)
    try:
        yield
    finally:
        _dependent_launches = previous


def dependent_launch_options(tensor: torch.Tensor) -> dict[str, bool]:
    """The launch options of a kernel that takes part in `dependent_launches`, for a launch on ``tensor``'s
    device: ``{"launch_pdl": True}`` inside it where this Triton allows it and the GPU (or the architecture
    compiled for) is a Hopper or later, else ``{}``."""
    if not _dependent_launches or interpreter_enabled() or not dependent_launch_available():
        return {}
    arch = _cuda_architecture(tensor.device.index) if tensor.device.type == "cuda" else _compiling_for or 0
    return {"launch_pdl": True} if arch >= 90 else {}


@functools.cache
def _cuda_architecture(index: int | None) -> int:
    """The compute capability of CUDA device ``index`` (None: the current one) as one number (90 for 9.0)."""
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def grid_dependency_functions() -> tuple[Any, Any]:
    """Triton's ``(gdc_wait, gdc_launch_dependents)`` for kernels to bind among their globals, or
    ``(None, None)`` where this Triton has none (kernels call them only when launched dependently)."""
    try:
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    except Exception:
        return None, None
    return gdc_wait, gdc_launch_dependents


def triton_disabled() -> bool:
    """Whether ``NEXTSTEP_DISABLE_TRITON`` turns the kernels off."""
    return os.environ.get(DISABLE_VARIABLE, "").strip().lower() not in ("", "0", "false", "no", "off")


def kernel_choice(use_kernels: bool | None) -> bool | None:
    """A ``use_kernels`` setting as it applies: False while ``NEXTSTEP_DISABLE_TRITON`` turns the kernels off,
    else as given (None: each call decides by `triton_enabled`; True: always the kernel; False: never)."""
    return False if triton_disabled() else use_kernels


def kernel_function(operation: Callable, use_kernels: bool | None) -> Callable:
    """The form of a fused operation that ``use_kernels`` picks (after `kernel_choice`): ``operation`` itself
    (the dispatching function) for None, its module's ``<name>_triton`` for True, ``<name>_reference`` for False."""
    use_kernels = kernel_choice(use_kernels)
    if use_kernels is None:
        return operation
    module = sys.modules[operation.__module__]
    return getattr(module, f"{operation.__name__}_triton" if use_kernels else f"{operation.__name__}_reference")


def triton_enabled(tensor: torch.Tensor) -> bool:
    """Whether a fused operation on ``tensor`` runs its Triton kernel rather than its reference.

    Args:
        tensor: the operation's main input; its device decides.
    """
    if triton_disabled():
        return False
    device = tensor.device.type
    if device == "cuda":
        return triton_available()
    return device == "cpu" and (interpreter_active() or _compiling_for is not None)


def block_size(width: int, largest: int = 1 << 16) -> int:
    """The power of two >= ``width`` that one Triton program covers, with a clear error past ``largest``.

    Args:
        width: elements in one row.
        largest: the widest block a kernel accepts.
    """
    size = 1 << max(0, int(width) - 1).bit_length()
    if size > largest:
        raise ValueError(f"rows of {width} elements exceed this kernel's limit of {largest}")
    return size


def check_power_of_two(name: str, value: int, smallest: int = 1) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a power of two >= ``smallest`` (a tile size)."""
    if not isinstance(value, int) or value < smallest or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= {smallest}, found {value!r}")


def check_num_warps(value: int) -> None:
    """Raise ``ValueError`` unless ``value`` is a warp count a Triton launch takes (1, 2, 4, 8 or 16)."""
    if value not in (1, 2, 4, 8, 16):
        raise ValueError(f"num_warps must be 1, 2, 4, 8 or 16, found {value!r}")


#: Running-sum elements a product kernel keeps per warp through its loop over K (64 fp32 registers per
#: thread): `reduction_step` lowers ``block_k`` to keep within it.
SUM_ELEMENTS_PER_WARP = 2048


def reduction_step(block_k: int, block_m: int, block_n: int, num_warps: int) -> int:
    """``block_k`` (a power of two) lowered to the largest power of two >= 16 with which a product's
    (block_m, block_n, block_k) running sums keep within `SUM_ELEMENTS_PER_WARP` per warp."""
    fits = max(1, SUM_ELEMENTS_PER_WARP * num_warps // (block_m * block_n))
    return max(16, min(block_k, 1 << (fits.bit_length() - 1)))


def contiguous_rows(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """``tensor`` if its last axis is contiguous (rows may be strided), else a contiguous copy; None stays None."""
    if tensor is None or tensor.stride(-1) == 1:
        return tensor
    return tensor.contiguous()


def dispatch(name: str, tensor: torch.Tensor, kernel: Callable, reference: Callable, *args: Any,
             **kwargs: Any) -> Any:
    """Run ``kernel(*args, **kwargs)`` where `triton_enabled` allows it, ``reference(...)`` otherwise.

    A kernel that raises anything but ``ValueError`` (the argument checks) is
    recorded in `FAILED_KERNELS`, reported once with a `KernelFallbackWarning`,
    and replaced by its reference for the rest of the process.

    Args:
        name: the operation's name.
        tensor: the main input (its device decides).
        kernel: the Triton version.
        reference: the eager version (same arguments).
        *args: positional arguments of both.
        **kwargs: keyword arguments of both.
    """
    if name not in FAILED_KERNELS and triton_enabled(tensor):
        try:
            return kernel(*args, **kwargs)
        except ValueError:
            raise
        except Exception as error:
            FAILED_KERNELS[name] = f"{type(error).__name__}: {str(error).strip()[:300]}"
            warnings.warn(f"the Triton kernel of {name} failed ({FAILED_KERNELS[name]}); using its PyTorch "
                          "reference from now on", KernelFallbackWarning, stacklevel=3)
    return reference(*args, **kwargs)
