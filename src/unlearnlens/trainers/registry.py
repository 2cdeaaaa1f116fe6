"""Unlearning methods by name: register your own, look up the built-in ones."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TypeVar

from unlearnlens._checks import check_float, check_int
from unlearnlens.errors import ConfigError, UnknownMethodError
from unlearnlens.trainers.base import MethodConfig, UnlearningMethod

__all__ = [
    "available_methods",
    "build_method",
    "get_method",
    "register_method",
    "unregister_method",
]

_REGISTRY: dict[str, type[UnlearningMethod]] = {}

M = TypeVar("M", bound=type[UnlearningMethod])


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator that registers an :class:`UnlearningMethod` under ``name``.

    Raises:
        ValueError: ``name`` is already taken (unregister it first), or is not a non-empty
            string.
        TypeError: The class is not an ``UnlearningMethod`` or its ``config_class`` is not a
            ``MethodConfig`` dataclass.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a method name must be a non-empty string, got {name!r}")

    def decorate(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, UnlearningMethod)):
            raise TypeError(
                f"@register_method({name!r}) needs an UnlearningMethod subclass, got {cls!r}"
            )
        cfg = cls.config_class
        if not (
            isinstance(cfg, type)
            and issubclass(cfg, MethodConfig)
            and dataclasses.is_dataclass(cfg)
        ):
            raise TypeError(
                f"{cls.__name__}.config_class must be a MethodConfig dataclass, got {cfg!r}"
            )
        if name in _REGISTRY:
            raise ValueError(
                f"an unlearning method named {name!r} is already registered "
                f"({_REGISTRY[name].__module__}.{_REGISTRY[name].__qualname__})"
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def unregister_method(name: str) -> None:
    """Removes a registered method (for tests and interactive redefinition)."""
    get_method(name)
    del _REGISTRY[name]


def available_methods() -> list[str]:
    """Names of the registered methods, sorted."""
    return sorted(_REGISTRY)


def get_method(name: str) -> type[UnlearningMethod]:
    """The method class registered under ``name``.

    Raises:
        UnknownMethodError: ``name`` is not registered; the message lists the known ones.
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        raise UnknownMethodError(
            f"unknown unlearning method {name!r}; known methods: {', '.join(available_methods())}"
        )
    return _REGISTRY[name]


def build_method(name: str, method_args: dict[str, object]) -> UnlearningMethod:
    """Instantiates method ``name`` with its config built from ``method_args``.

    Raises:
        UnknownMethodError: ``name`` is not registered.
        ConfigError: An argument the method's config has no field for (the message lists the
            fields), or a value its ``__post_init__`` rejects.
    """
    cls = get_method(name)
    fields = [f.name for f in dataclasses.fields(cls.config_class)]
    extra = sorted(set(method_args) - set(fields))
    if extra:
        raise ConfigError(
            f"method {name!r} has no option(s) {extra}; its options are: "
            f"{', '.join(fields) or '(none)'}"
        )
    for key, value in method_args.items():
        _check_number(name, key, _FIELD_TYPES.get(_type_name(cls.config_class, key)), value)
    try:
        config = cls.config_class(**method_args)
    except TypeError as e:
        raise ConfigError(f"bad options for method {name!r}: {e}") from e
    return cls(config)


_FIELD_TYPES = {
    "float": ("float", False),
    "float | None": ("float", True),
    "int": ("int", False),
    "int | None": ("int", True),
}


def _type_name(config_class: type, key: str) -> str:
    for f in dataclasses.fields(config_class):
        if f.name == key:
            return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
    return ""


def _check_number(method: str, key: str, kind: tuple[str, bool] | None, value: object) -> None:
    """Numeric options are real, finite numbers of their declared kind (never coerced)."""
    if kind is None or (kind[1] and value is None):
        return
    what = f"{key} (an option of method {method!r})"
    if kind[0] == "int":
        check_int(value, what)
    else:
        check_float(value, what)
