"""Dataset names for recipes: ``{"type": "shapes", ...}`` -> a dataset object.

A dataset class is registered with `register_dataset`; it has a
``config_class`` (a `nextstep.config.Config` dataclass) and takes that config
as its only constructor argument.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

T = TypeVar("T", bound=type)

_DATASETS: dict[str, type] = {}


def register_dataset(name: str) -> Callable[[T], T]:
    """Class decorator: make a dataset class reachable as ``{"type": name}`` in recipes."""

    def decorator(cls: T) -> T:
        if not hasattr(cls, "config_class"):
            raise TypeError(f"{cls.__name__} needs a 'config_class' attribute to be registered")
        existing = _DATASETS.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(f"dataset {name!r} is already registered to {existing.__name__}")
        _DATASETS[name] = cls
        cls.registry_name = name
        return cls

    return decorator


def _ensure_builtins() -> None:
    import nextstep.training.data.editing  # noqa: F401
    import nextstep.training.data.emoji  # noqa: F401
    import nextstep.training.data.fashion_mnist  # noqa: F401
    import nextstep.training.data.folder  # noqa: F401
    import nextstep.training.data.latent_cache  # noqa: F401
    import nextstep.training.data.photos  # noqa: F401
    import nextstep.training.data.shapes  # noqa: F401
    import nextstep.training.data.webdataset  # noqa: F401


def dataset_names() -> list[str]:
    """Registered dataset names, sorted."""
    _ensure_builtins()
    return sorted(_DATASETS)


def dataset_class(name: str) -> type:
    """The class registered as ``name``; ``ValueError`` lists the known names."""
    _ensure_builtins()
    try:
        return _DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset type {name!r}; known: {sorted(_DATASETS)}") from None


def dataset_config(spec: dict[str, Any]):
    """Parse ``{"type": name, **fields}`` into ``(class, config)``; typos name the key."""
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError(f"a dataset spec must be a mapping with a 'type' key, found {spec!r}")
    fields = dict(spec)
    cls = dataset_class(fields.pop("type"))
    return cls, cls.config_class.from_dict(fields)


def build_dataset(spec: dict[str, Any]):
    """Instantiate the dataset described by ``{"type": name, **fields}``."""
    cls, config = dataset_config(spec)
    return cls(config)
