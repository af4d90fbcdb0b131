"""Name -> class and name -> preset tables, used for discovery only.

The CLI, JSON configs and the test suite look components and model presets up
here. Nothing requires registration: a model accepts any component instance that
implements its interface. Registering a class only makes it reachable by name
(for example from ``config.json`` or ``nextstep generate --model``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, TypeVar

T = TypeVar("T", bound=type)

_COMPONENTS: dict[str, dict[str, type]] = {
    "image_tokenizer": {},
    "text_tokenizer": {},
    "backbone": {},
    "image_head": {},
    "sampler": {},
}
_MODELS: dict[str, Callable] = {}


def register_component(kind: str, name: str, *, replace: bool = False) -> Callable[[T], T]:
    """Class decorator: make ``cls`` reachable as ``(kind, name)``.

    The class must have a ``config_class`` attribute (its config dataclass) and
    accept that config as its only constructor argument. A name belongs to one
    class: registering another class under it raises ``ValueError``, unless
    ``replace`` (for a class defined again, as when a notebook cell runs twice).
    Subclasses are not registered with their parent: each class that is saved
    by name is decorated itself.
    """
    if kind not in _COMPONENTS:
        raise ValueError(f"kind must be one of {sorted(_COMPONENTS)}, found {kind!r}")

    def decorator(cls: T) -> T:
        if getattr(cls, "config_class", None) is None:
            raise TypeError(f"{cls.__name__} needs a 'config_class' attribute (a Config dataclass) to be registered")
        # A saved component is {"kind": ..., "type": ..., **its config}: its config cannot use those names.
        clashing = sorted({"kind", "type"} & {field.name for field in dataclasses.fields(cls.config_class)})
        if clashing:
            raise ValueError(f"{cls.config_class.__name__} has field(s) {clashing}, which name the component "
                             "in a saved config; rename them")
        existing = _COMPONENTS[kind].get(name)
        if existing is not None and existing is not cls and not replace:
            raise ValueError(f"{kind} {name!r} is already registered to {existing.__name__} (replace=True "
                             "gives the name to the new class)")
        if existing is not None and existing is not cls and existing.__dict__.get("registry_name") == name:
            del existing.registry_name  # the replaced class is no longer reachable by that name
        _COMPONENTS[kind][name] = cls
        cls.registry_name = name
        return cls

    return decorator


def component_class(kind: str, name: str) -> type:
    """The class registered as ``(kind, name)``; ``ValueError`` lists the known names."""
    _ensure_builtins()
    if not isinstance(kind, str) or kind not in _COMPONENTS:
        raise ValueError(f"kind must be one of {sorted(_COMPONENTS)}, found {kind!r}")
    if not isinstance(name, str):
        raise ValueError(f"a {kind}'s type must be a registered name (a string), found {type(name).__name__} {name!r}")
    try:
        return _COMPONENTS[kind][name]
    except KeyError:
        raise ValueError(
            f"unknown {kind} {name!r}; known: {sorted(_COMPONENTS[kind])} (a component of your own is known once "
            "the module that registers it is imported; on the command line: --import MODULE)"
        ) from None


def registered_name(kind: str, cls: type) -> str | None:
    """The name ``cls`` itself is registered under as ``kind``, or None (a subclass of a registered
    class is not registered with it)."""
    _ensure_builtins()
    name = cls.__dict__.get("registry_name")
    return name if name is not None and _COMPONENTS.get(kind, {}).get(name) is cls else None


def component_names(kind: str) -> list[str]:
    """Registered names of one kind, sorted."""
    _ensure_builtins()
    return sorted(_COMPONENTS[kind])


def register_model(name: str, *, replace: bool = False) -> Callable[[Callable], Callable]:
    """Decorator for a model preset: a function returning a ``ModelConfig``.

    A name belongs to one function: registering another under it raises
    ``ValueError``, unless ``replace`` (for a preset defined again, as when a
    notebook cell runs twice).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a model preset's name must be a non-empty string, found {name!r}")

    def decorator(fn: Callable) -> Callable:
        if not callable(fn):
            raise TypeError(f"register_model decorates a function returning a ModelConfig, found {type(fn).__name__}")
        existing = _MODELS.get(name)
        if existing is not None and existing is not fn and not replace:
            raise ValueError(f"model preset {name!r} is already registered to {_qualified(existing)} (replace=True "
                             "gives the name to the new function)")
        _MODELS[name] = fn
        return fn

    return decorator


def _qualified(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def model_preset(name: str) -> Callable:
    """The preset function registered as ``name``; ``ValueError`` lists the known ones."""
    _ensure_builtins()
    try:
        return _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(_MODELS)} (a preset of your own is known "
                         "once the module that registers it with register_model is imported; on the command "
                         "line: --import MODULE)") from None


def model_names() -> list[str]:
    _ensure_builtins()
    return sorted(_MODELS)


def _ensure_builtins() -> None:
    import nextstep.backbones  # noqa: F401
    import nextstep.heads  # noqa: F401
    import nextstep.presets  # noqa: F401
    import nextstep.samplers  # noqa: F401
    import nextstep.tokenizers  # noqa: F401
