"""The pass registry: passes by their CLI/recipe name.

``import graphopt`` imports the built-in passes (``graphopt.passes``), which register
themselves with ``@register``; this module never imports the passes above it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from graphopt.core.config import make_config
from graphopt.core.contract import Pass
from graphopt.errors import ConfigError

_REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass findable by its name from the CLI and recipes."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"pass name '{cls.name}' is taken by {_REGISTRY[cls.name].__name__}")
    _REGISTRY[cls.name] = cls
    return cls


def registered_passes() -> dict[str, type[Pass]]:
    """Every registered pass by name (the built-ins are registered by ``import graphopt``)."""
    return dict(sorted(_REGISTRY.items()))


def get_pass_class(name: str) -> type[Pass]:
    passes = registered_passes()
    if name not in passes:
        raise ConfigError(f"unknown pass '{name}' (known: {', '.join(passes)})")
    return passes[name]


def build_pass(name: str, options: Mapping[str, Any] | None = None) -> Pass:
    cls = get_pass_class(name)
    return cls(make_config(cls.Config, dict(options or {}), name))
