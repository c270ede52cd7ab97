"""The one place where methods are registered, by name.

A method is a config dataclass named ``<Method>Config`` with a class attribute ``method`` (its
registered name). The core only ever talks to configs through the interface of
:class:`peftlab.config.MethodConfig`; it never imports a method module by name.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .errors import ConfigError, UnknownMethodError

_REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: register a method config under ``cls.method``."""
    name = getattr(cls, "method", None)
    if not name or not isinstance(name, str):
        raise TypeError(f"{cls.__name__} must define a class attribute `method: ClassVar[str]`")
    if not cls.__name__.endswith("Config"):
        raise TypeError(f"method config classes are named <Method>Config, got {cls.__name__}")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"method {name!r} already registered by {_REGISTRY[name].__name__}")
    _REGISTRY[name] = cls
    return cls


def _ensure_loaded() -> None:
    """Import the built-in methods (registering them). Deferred to the first look-up: the tuners import
    the config base, which imports this module."""
    from . import compose, tuners  # noqa: F401


def methods() -> list[str]:
    """Names of all registered methods, sorted."""
    _ensure_loaded()
    return sorted(_REGISTRY)


def config_class(name: str) -> type:
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMethodError(f"unknown method {name!r}; registered methods: {', '.join(methods())}") from None


def get_config(name: str, **params: Any):
    """Build the config of method ``name`` from keyword parameters, rejecting unknown keys."""
    cls = config_class(name)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise ConfigError(
            f"{cls.__name__} got unknown parameter(s) {', '.join(unknown)}; "
            f"valid parameters: {', '.join(sorted(fields))}"
        )
    return cls.from_dict(params)
