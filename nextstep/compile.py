"""``torch.compile`` that never takes the process down: a failed compilation falls back to eager.

`safe_compile` wraps a function (or a module's ``forward``, see `compile_module`)
so that its calls run the compiled version, and, the first time compiling or
running the compiled version raises while the eager function succeeds on the
same arguments, warns once with a `CompileFallbackWarning` naming the error and
runs eagerly from then on. Errors that the eager function raises too (bad
arguments, for example) are raised as they are.

Setting the environment variable ``NEXTSTEP_DISABLE_COMPILE`` (to anything but
``0`` or the empty string) skips compilation everywhere.

A compiled function that failed after writing into its arguments in place is
run again eagerly on the partly written arguments; compilation errors are
raised before anything runs, which is the usual case. In training, a failure
to compile the backward graph surfaces in ``loss.backward()``, outside this
wrapper.
"""

from __future__ import annotations

import copy
import functools
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from nextstep.config import Config, require

__all__ = ["COMPILE_MODES", "CompileConfig", "CompileFallbackWarning", "SafeCompiled", "compile_module",
           "safe_compile"]

#: Environment variable that turns compilation off (eager everywhere).
DISABLE_VARIABLE = "NEXTSTEP_DISABLE_COMPILE"

#: ``mode`` values accepted by ``torch.compile`` (None: its default).
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class CompileFallbackWarning(RuntimeWarning):
    """``torch.compile`` failed; the function runs eagerly instead."""


def compile_disabled() -> bool:
    """Whether ``NEXTSTEP_DISABLE_COMPILE`` turns compilation off."""
    return os.environ.get(DISABLE_VARIABLE, "").strip() not in ("", "0")


@dataclass
class CompileConfig(Config):
    """Whether and how to compile, as data (for training and inference configs).

    Args:
        enabled: compile at all.
        mode: a ``torch.compile`` mode (`COMPILE_MODES`); None for its default.
        fullgraph: refuse graph breaks (a break then counts as a failure and falls back).
        dynamic: ``torch.compile``'s ``dynamic`` (None: decide automatically).
        backend: ``torch.compile`` backend name (``inductor``; ``eager`` checks tracing only).
    """

    enabled: bool = False
    mode: str | None = None
    fullgraph: bool = False
    dynamic: bool | None = None
    backend: str = "inductor"

    def validate(self) -> None:
        require(self.mode in COMPILE_MODES, "mode", self.mode, f"one of {list(COMPILE_MODES)}")
        require(isinstance(self.backend, str) and bool(self.backend), "backend", self.backend,
                "a non-empty backend name")

    def options(self) -> dict[str, Any]:
        """Keyword arguments for ``torch.compile``."""
        options: dict[str, Any] = {"fullgraph": self.fullgraph, "dynamic": self.dynamic, "backend": self.backend}
        if self.mode is not None:
            options["mode"] = self.mode
        return options


def _describe(error: BaseException) -> str:
    """The error's type and its first two non-empty lines, shortened."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {' '.join(lines[:2])[:300]}"


class SafeCompiled:
    """A callable that runs ``torch.compile(fn)`` and falls back to ``fn`` for good if that fails.

    Args:
        fn: the eager function.
        name: how warnings refer to it (default: its qualified name).
        **compile_options: passed to ``torch.compile``.

    Attributes:
        fn: the eager function.
        failure: None while the compiled version is in use, else why it was abandoned.
    """

    def __init__(self, fn: Callable, *, name: str | None = None, **compile_options: Any):
        if not callable(fn):
            raise TypeError(f"safe_compile needs a callable, found {type(fn).__name__}")
        self.fn = fn
        self.name = name or getattr(fn, "__qualname__", None) or type(fn).__name__
        self.compile_options = compile_options
        self.failure: str | None = None
        self._compiled: Callable | None = None
        functools.update_wrapper(self, fn, updated=())
        self._compile()

    def _compile(self) -> None:
        """Compile ``fn`` (unless compilation is disabled by the environment), falling back on failure."""
        self._compiled = None
        if compile_disabled():
            self.failure = f"{DISABLE_VARIABLE} is set"
            return
        try:
            self._compiled = torch.compile(self.fn, **self.compile_options)
        except Exception as error:  # for example an unsupported Python version or a bad option
            self._fall_back(error)

    @property
    def compiled(self) -> bool:
        """Whether calls still go to the compiled version."""
        return self._compiled is not None

    def _fall_back(self, error: BaseException) -> None:
        self._compiled = None
        self.failure = _describe(error)
        warnings.warn(f"torch.compile of {self.name} failed ({self.failure}); running it eagerly from now on",
                      CompileFallbackWarning, stacklevel=3)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        compiled = self._compiled
        if compiled is None:
            return self.fn(*args, **kwargs)
        try:
            return compiled(*args, **kwargs)
        except Exception as error:
            result = self.fn(*args, **kwargs)  # raises too when the arguments are at fault
            self._fall_back(error)
            return result

    def __deepcopy__(self, memo: dict) -> "SafeCompiled":
        """A copy that calls the copied function (a module's copy runs its own weights), compiled anew
        unless this one had fallen back to eager."""
        clone = copy.copy(self)
        memo[id(self)] = clone
        clone.fn = copy.deepcopy(self.fn, memo)
        clone.compile_options = copy.deepcopy(self.compile_options, memo)
        clone.__wrapped__ = clone.fn
        if self._compiled is not None:  # (an eager fallback's copy stays eager, as copied)
            clone._compile()
        return clone

    def __getstate__(self) -> dict:
        """Pickled without the compiled function (it cannot be), which loading compiles anew unless this
        one had fallen back to eager (so a module compiled in place saves with ``torch.save``)."""
        state = dict(self.__dict__)
        state["_compiled"] = None
        state["_recompile"] = self._compiled is not None
        return state

    def __setstate__(self, state: dict) -> None:
        recompile = state.pop("_recompile", False)
        self.__dict__.update(state)
        if recompile:
            self._compile()

    def __repr__(self) -> str:
        state = "compiled" if self.compiled else f"eager ({self.failure})"
        return f"SafeCompiled({self.name}, {state})"


def safe_compile(fn: Callable, *, name: str | None = None, **compile_options: Any) -> SafeCompiled:
    """``torch.compile(fn, **compile_options)`` with an eager fallback (see `SafeCompiled`).

    Args:
        fn: the function to compile.
        name: how warnings refer to it.
        **compile_options: passed to ``torch.compile`` (``mode``, ``fullgraph``, ``dynamic``, ``backend``).
    """
    return SafeCompiled(fn, name=name, **compile_options)


def compile_module(module: nn.Module, config: CompileConfig | None = None, **compile_options: Any) -> nn.Module:
    """Compile ``module.forward`` in place with an eager fallback; parameters and state-dict keys are unchanged.

    Calling ``module(...)`` (hooks included) then runs the compiled forward.
    Undo with ``del module.forward``.

    Args:
        module: the module.
        config: a `CompileConfig`; nothing happens unless ``config.enabled``.
            When given, ``compile_options`` must be empty.
        **compile_options: passed to ``torch.compile`` when no config is given.

    Returns:
        the same module.
    """
    if config is not None:
        if compile_options:
            raise ValueError(f"pass either a CompileConfig or compile options, found both ({sorted(compile_options)})")
        if not config.enabled:
            return module
        compile_options = config.options()
    forward = module.forward
    if isinstance(forward, SafeCompiled):
        return module
    module.forward = safe_compile(forward, name=f"{type(module).__name__}.forward", **compile_options)
    return module
