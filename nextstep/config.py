"""Configuration dataclasses that round-trip through JSON.

Every component has one dataclass describing it. Configs are plain data: they
validate themselves on construction, serialise to ``dict``/JSON, and refuse keys
they do not know so that a typo never passes silently.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import json
import math
import operator
import os
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, TypeVar

C = TypeVar("C", bound="Config")

OMITTED_WHEN_DEFAULT = {"omitted_when_default": True}
"""Field metadata for an optional field added after configs were written: ``to_dict``
leaves it out while it holds its default, so older files (and anything that hashes
a config's JSON) stay exactly as they were. Use as
``dataclasses.field(default=0, metadata=OMITTED_WHEN_DEFAULT)``."""


class Config:
    """Mixin for dataclass configs: validation, ``to_dict``/``from_dict``, JSON I/O.

    Subclasses are ``@dataclass`` classes and may override `validate`, which
    raises ``ValueError`` naming the offending field and value.
    """

    def __post_init__(self) -> None:
        hints = _type_hints(type(self))
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, field.name)
            expected = _plain_mismatch(hints.get(field.name), value)
            if expected is not None:
                raise ValueError(f"{type(self).__name__}.{field.name} must be {expected}, "
                                 f"found {type(value).__name__} {value!r}")
            value = _from_plain(hints.get(field.name), value)  # a nested config given as a mapping
            if isinstance(value, list):
                value = tuple(value)
            setattr(self, field.name, value)
        try:
            self.validate()
        except ValueError as error:  # named by its config, as the type checks above are
            name = type(self).__name__
            if type(error) is not ValueError or str(error).startswith(name):
                raise
            raise ValueError(f"{name}: {error}") from None

    def validate(self) -> None:
        """Raise ``ValueError`` if a field holds an invalid value."""

    def to_dict(self) -> dict[str, Any]:
        """Plain-data view: nested configs become dicts, tuples become lists.

        Fields marked `OMITTED_WHEN_DEFAULT` are left out while they hold their default.
        """
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, field.name)
            if field.metadata.get("omitted_when_default") and value == _default_of(field):
                continue
            out[field.name] = plain_data(value)
        return out

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Build from plain data; unknown keys, missing required keys and values of the wrong type raise
        ``ValueError`` naming them."""
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__} expects a mapping, found {type(data).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(
                f"{cls.__name__} got unknown key(s) {unknown}; known keys are {sorted(known)}"
            )
        hints = _type_hints(cls)
        kwargs = {}
        for name, value in data.items():
            expected = _plain_mismatch(hints.get(name), value)
            if expected is not None:
                raise ValueError(f"{cls.__name__}.{name} must be {expected}, found {type(value).__name__} {value!r}")
            if hints.get(name) is ComponentSpec and name in ComponentSpec.kinds and isinstance(value, dict) \
                    and value.get("kind", name) != name:  # the field names the kind of component it holds
                raise ValueError(f"{cls.__name__}.{name} must be a component of kind {name!r}, found kind "
                                 f"{value['kind']!r}")
            kwargs[name] = _from_plain(hints.get(name), value)
        missing = [name for name, f in known.items() if name not in data and f.init and
                   f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ValueError(f"{cls.__name__} needs key(s) {missing}, found {sorted(data)}")
        return cls(**kwargs)

    def replace(self: C, **changes: Any) -> C:
        """A copy with some fields changed (validated again); an unknown field raises ``ValueError``
        naming the known ones."""
        known = {f.name for f in dataclasses.fields(self) if f.init}  # type: ignore[arg-type]
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"{type(self).__name__} has no field(s) {unknown}; known fields are {sorted(known)}")
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False, allow_nan=False)

    @classmethod
    def from_json(cls: type[C], text: str) -> C:
        """`from_dict` of JSON ``text``; text that is not JSON raises ``ValueError`` naming the class."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{cls.__name__} expects JSON text, found {text!r:.60} ({error})") from None
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike) -> None:
        """Write as JSON atomically."""
        from nextstep.io import atomic_write_text

        atomic_write_text(Path(path), self.to_json() + "\n")

    @classmethod
    def load(cls: type[C], path: str | os.PathLike) -> C:
        from nextstep.io import what_is_at

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"expected a config file at {path}, found {what_is_at(path)}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is not valid JSON text: {error}") from error
        return cls.from_dict(data)


@functools.lru_cache(maxsize=None)
def _type_hints(cls: type) -> dict[str, Any]:
    """The resolved field types of ``cls``; none for a class whose annotations name what its module cannot
    resolve (a config defined inside a function), whose fields are then taken as given."""
    try:
        return typing.get_type_hints(cls)
    except NameError:
        return {}


def _default_of(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def plain_data(value: Any) -> Any:
    """``value`` as JSON holds it: configs and component specs as mappings, tuples as lists, at any depth."""
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, ComponentSpec):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [plain_data(v) for v in value]
    if isinstance(value, dict):
        return {k: plain_data(v) for k, v in value.items()}
    return value


def plain_differences(path: str, there: Any, here: Any) -> list[tuple[str, Any, Any]]:
    """Where two plain-data values differ, as (dotted path, value there, value here), down to the
    deepest mappings and equal-length lists that hold them (``data.datasets.0.num_samples``)."""
    if there == here:
        return []
    if isinstance(there, dict) and isinstance(here, dict):
        return [difference for key in sorted(set(there) | set(here), key=str)
                for difference in plain_differences(f"{path}.{key}", there.get(key), here.get(key))]
    if isinstance(there, list) and isinstance(here, list) and len(there) == len(here):
        return [difference for index, (a, b) in enumerate(zip(there, here))
                for difference in plain_differences(f"{path}.{index}", a, b)]
    return [(path, there, here)]


def differences_phrase(differences: list[tuple[str, Any, Any]], most: int = 6, width: int = 160) -> str:
    """`plain_differences` in words: 'path: value there, value here' for the first ``most`` of them (each
    value as JSON, cut at ``width`` characters), and how many more there are."""
    def shown(value: Any) -> str:
        text = json.dumps(value, sort_keys=True)
        return text if len(text) <= width else text[:width - 3] + "..."

    phrase = "; ".join(f"{path}: {shown(there)} there, {shown(here)} here" for path, there, here in differences[:most])
    return phrase + (f"; and {len(differences) - most} more" if len(differences) > most else "")


def _from_plain(hint: Any, value: Any) -> Any:
    if hint is None:
        return value
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                return _from_plain(arg, value)
    if isinstance(hint, type) and issubclass(hint, ComponentSpec):
        return value if isinstance(value, ComponentSpec) else ComponentSpec.from_dict(value)
    if isinstance(hint, type) and issubclass(hint, Config) and isinstance(value, dict):
        return hint.from_dict(value)
    if (hint is tuple or origin in (tuple, list, collections.abc.Sequence)) and isinstance(value, (list, tuple)):
        if origin is tuple and args and args[-1] is not Ellipsis:  # one hint per position
            items = [_from_plain(item_hint, element) for item_hint, element in zip(args, value)]
        else:
            items = [_from_plain(args[0] if args else None, element) for element in value]
        return tuple(items) if origin is tuple or hint is tuple else items
    if origin is dict and len(args) == 2 and isinstance(value, dict):
        return {key: _from_plain(args[1], element) for key, element in value.items()}
    return value


_PLAIN_TYPES: dict[type, tuple[type, ...]] = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}
_PLAIN_NAMES = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}


def _plain_mismatch(hint: Any, value: Any) -> str | None:
    """What plain data ``hint`` expects when ``value`` does not fit it (None when it fits, or when the
    hint says too little to tell); checks scalars, sequences, mappings and nested configs."""
    if hint is None or hint is Any:
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        mismatches = [_plain_mismatch(arg, value) if arg is not type(None) else
                      (None if value is None else "null") for arg in args]
        return None if None in mismatches else " or ".join(dict.fromkeys(mismatches))
    if origin is typing.Literal:
        return None if value in args else f"one of {list(args)}"
    if hint in _PLAIN_TYPES:
        fits = isinstance(value, _PLAIN_TYPES[hint]) and (hint is bool or not isinstance(value, bool))
        if fits and hint is float:
            try:
                fits = math.isfinite(value)
            except OverflowError:  # an integer too large for a float
                fits = False
        return None if fits else _PLAIN_NAMES[hint]
    if hint is tuple or origin in (tuple, list, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return "a list"
        if origin is tuple and args and args[-1] is not Ellipsis:  # fixed length, one hint per position
            if len(args) != len(value):
                return f"a list of {len(args)} items"
            items = list(zip(args, value))
        else:
            items = [(args[0], element) for element in value] if args else []
        for item_hint, element in items:
            inner = _plain_mismatch(item_hint, element)
            if inner is not None:
                return f"a list whose items are each {inner}"
        return None
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            return "a mapping"
        for element in value.values() if len(args) == 2 else ():
            inner = _plain_mismatch(args[1], element)
            if inner is not None:
                return f"a mapping whose values are each {inner}"
        return None
    if isinstance(hint, type) and issubclass(hint, (Config, ComponentSpec)):
        return None if isinstance(value, (dict, hint)) else f"a mapping ({hint.__name__})"
    return None


def as_integer(value: Any) -> int | None:
    """``value`` as an int when it is an integer of any type (Python, NumPy, a 0-d integer tensor); None for
    anything else, a bool included."""
    if isinstance(value, bool) or (hasattr(value, "ndim") and hasattr(value, "dtype") and (
            value.ndim != 0 or "bool" in str(value.dtype))):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def is_count(value: Any) -> bool:
    """Whether ``value`` is a Python int >= 1 (a bool is not)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def require_count(name: str, value: Any) -> None:
    """Raise ``ValueError(f"{name} must be an integer >= 1, found {value!r}")`` unless `is_count`."""
    require(is_count(value), name, value, "an integer >= 1")


def described(value: Any) -> str:
    """How a message shows a value it refuses: ``40`` for a Python int, with the type otherwise
    (``float 40.0``, ``bool True``), where the type is what is wrong."""
    return repr(value) if type(value) is int else f"{type(value).__name__} {value!r}"


def require(condition: bool, field: str, value: Any, expected: str) -> None:
    """Raise ``ValueError(f"{field} must be {expected}, found {value!r}")`` unless ``condition``."""
    if not condition:
        raise ValueError(f"{field} must be {expected}, found {value!r}")


class ComponentSpec:
    """A component named by its registry ``type`` plus that component's config.

    Serialises as ``{"kind": kind, "type": name, **config_fields}``.

    Args:
        kind: registry section, e.g. ``"backbone"``.
        type: registered name, e.g. ``"qwen2"``.
        config: the component's config dataclass instance.
    """

    kinds: ClassVar[tuple[str, ...]] = (
        "image_tokenizer",
        "text_tokenizer",
        "backbone",
        "image_head",
        "sampler",
    )

    def __init__(self, kind: str, type: str, config: Config):
        if kind not in self.kinds:
            raise ValueError(f"component kind must be one of {list(self.kinds)}, found {kind!r}")
        if not isinstance(config, Config):
            raise ValueError(f"a {kind}'s config must be a Config dataclass, found {config.__class__.__name__}")
        self.kind = kind
        self.type = type
        self.config = config

    @classmethod
    def named(cls, kind: str, name: str) -> "ComponentSpec":
        """The spec of registered component ``name`` of ``kind`` with its default config.

        Raises:
            ValueError: an unknown kind or name, naming the known ones.
        """
        from nextstep.registry import component_class

        return cls(kind, name, component_class(kind, name).config_class())

    @classmethod
    def of(cls, kind: str, component: Any) -> "ComponentSpec":
        """The spec of a live ``component`` of ``kind``: the name its class is registered under, its config.

        Raises:
            ValueError: a class not registered itself (a subclass is not registered with its parent)
                or a component without a config, saying how to register it.
        """
        from nextstep.registry import registered_name

        name = registered_name(kind, type(component))
        if name is None or not hasattr(component, "config"):
            raise ValueError(
                f"{kind} {type(component).__name__} is not registered (a subclass is not registered with its "
                f"parent); decorate it with @register_component({kind!r}, NAME) and give it a config_class "
                "to save it"
            )
        return cls(kind, name, component.config)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "type": self.type, **self.config.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ComponentSpec":
        from nextstep.registry import component_class

        if not isinstance(data, dict) or "kind" not in data or "type" not in data:
            raise ValueError(
                "a component spec must be a mapping with 'kind' and 'type' keys, "
                f"found {data!r}"
            )
        data = dict(data)
        kind, name = data.pop("kind"), data.pop("type")
        component = component_class(kind, name)
        return cls(kind, name, component.config_class.from_dict(data))

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, ComponentSpec)
            and (self.kind, self.type) == (other.kind, other.type)
            and self.config == other.config
        )

    def __repr__(self) -> str:
        return f"ComponentSpec({self.kind!r}, {self.type!r}, {self.config!r})"
