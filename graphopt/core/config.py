"""Pass configs from recipes and the CLI: type coercion, validation, ``--pass`` specs.

1. ``make_config(Config, options, name)`` builds a pass's frozen config dataclass from a
   mapping of strings or values; unknown keys, wrong types and out-of-range values raise
   ``ConfigError`` naming the pass and the option.
2. ``parse_pass_spec("NAME:key=value,...")`` splits a ``--pass`` argument.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

from graphopt.errors import ConfigError


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Turn a recipe/CLI value into the field's type, or raise ConfigError."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, args))}")
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else str
        return tuple(_coerce(v.strip() if isinstance(v, str) else v, inner, where) for v in items
                     if not (isinstance(v, str) and not v.strip()))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if annotation in (int, float):
        # bool is an int to Python, never to a user; an int is a fine float, not vice versa
        exact = (int,) if annotation is int else (int, float)
        if isinstance(value, exact) and not isinstance(value, bool):
            return annotation(value)
        if isinstance(value, str):
            try:
                return annotation(value)
            except ValueError:
                pass
        what = "an integer" if annotation is int else "a number"
        raise ConfigError(f"{where}: expected {what}, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def make_config(config_cls: type, options: Mapping[str, Any], pass_name: str = "") -> Any:
    """Build a pass config from a mapping (recipe entry or parsed ``--pass`` options).

    Unknown keys, wrong types and out-of-range values raise ``ConfigError`` naming the pass
    and the option.
    """
    label = f"pass '{pass_name}'" if pass_name else config_cls.__name__
    hints = typing.get_type_hints(config_cls)
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    unknown = [k for k in options if k not in fields]
    if unknown:
        known = ", ".join(fields) or "none"
        raise ConfigError(f"{label}: unknown option '{unknown[0]}' (known options: {known})")
    values = {k: _coerce(v, hints[k], f"{label} option '{k}'") for k, v in options.items()}
    try:
        return config_cls(**values)
    except ConfigError as exc:
        raise ConfigError(f"{label}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{label}: {exc}") from None


def config_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else {}


def parse_pass_spec(text: str) -> tuple[str, dict[str, str]]:
    """``"prune-layers:indices=3,4,ratio=0.5"`` -> ``("prune-layers", {...})``.

    A comma-separated token without ``=`` continues the previous option's value, so list
    values need no quoting.
    """
    name, _, rest = text.partition(":")
    name = name.strip()
    if not name:
        raise ConfigError(f"bad --pass '{text}': expected NAME or NAME:key=value,...")
    options: dict[str, str] = {}
    last = None
    for token in filter(None, (t.strip() for t in rest.split(","))):
        if "=" in token:
            key, _, value = token.partition("=")
            key = key.strip().replace("-", "_")
            if not key:
                raise ConfigError(f"bad --pass '{text}': empty option name")
            options[key] = value.strip()
            last = key
        elif last is not None:
            options[last] += "," + token
        else:
            raise ConfigError(f"bad --pass '{text}': '{token}' is not key=value")
    return name, options
