"""Recipes: YAML or JSON files naming passes and their settings, for repeatable builds.

    # recipe.yaml
    input_shapes: {input_ids: [8, 128]}   # optional
    on_error: stop                        # optional: stop | continue
    passes:
      - cleanup                           # a bare name: default settings
      - name: prune-channels              # a mapping with `name` and option keys
        ratio: 0.5
      - fold-pad: {}                      # or {pass-name: {options}}

1. Unknown top-level keys, unknown passes, unknown options, wrong types and out-of-range
   values are ``ConfigError`` naming the file, the entry and the key.
2. The options are the pass's config dataclass fields: the CLI's ``--pass NAME:key=value``
   and recipes read the same dataclass.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graphopt.errors import ConfigError
from graphopt.ir.inputs import Shape
from graphopt.core.contract import Pass
from graphopt.core.registry import build_pass
from graphopt.core.config import parse_pass_spec

_TOP_KEYS = {"passes", "input_shapes", "on_error", "description"}


@dataclass
class Recipe:
    passes: list[Pass]
    input_shapes: dict[str, Shape] = field(default_factory=dict)
    on_error: str = "stop"
    description: str = ""


def _read(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None


def _entry_to_pass(entry: Any, where: str) -> Pass:
    if isinstance(entry, str):
        name, options = parse_pass_spec(entry)
    elif isinstance(entry, Mapping) and "name" in entry:
        options = {k: v for k, v in entry.items() if k != "name"}
        name = entry["name"]
    elif isinstance(entry, Mapping) and len(entry) == 1:
        (name, options), = entry.items()
        options = options or {}
        if not isinstance(options, Mapping):
            raise ConfigError(f"{where}: options of '{name}' must be a mapping")
    else:
        raise ConfigError(
            f"{where}: expected a pass name or a mapping with 'name', got {entry!r}"
        )
    if not isinstance(name, str):
        raise ConfigError(f"{where}: pass name must be a string, got {name!r}")
    try:
        return build_pass(name, {str(k).replace("-", "_"): v for k, v in options.items()})
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _shapes(value: Any, where: str) -> dict[str, Shape]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: input_shapes must map input names to lists of dims")
    shapes = {}
    for name, dims in value.items():
        if isinstance(dims, str):
            dims = dims.replace(",", "x").split("x")
        try:
            shape = tuple(int(d) for d in dims)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: input_shapes.{name} must be a list of integers") from None
        if any(d <= 0 for d in shape):
            raise ConfigError(f"{where}: input_shapes.{name} dims must be positive")
        shapes[str(name)] = shape
    return shapes


def recipe_from_data(data: Any, source: str = "recipe") -> Recipe:
    """A Recipe from already-parsed data (a mapping, or a bare list of passes)."""
    if isinstance(data, Sequence) and not isinstance(data, str):
        data = {"passes": list(data)}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping with a 'passes' list")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise ConfigError(
            f"{source}: unknown key '{sorted(unknown)[0]}' (known: {', '.join(sorted(_TOP_KEYS))})"
        )
    entries = data.get("passes")
    if not isinstance(entries, Sequence) or isinstance(entries, str) or not entries:
        raise ConfigError(f"{source}: 'passes' must be a non-empty list")
    passes = [_entry_to_pass(e, f"{source}: passes[{i}]") for i, e in enumerate(entries)]
    on_error = data.get("on_error", "stop")
    if on_error not in ("stop", "continue"):
        raise ConfigError(f"{source}: on_error must be 'stop' or 'continue', not {on_error!r}")
    shapes = _shapes(data["input_shapes"], source) if data.get("input_shapes") else {}
    return Recipe(passes, shapes, on_error, str(data.get("description", "")))


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    return recipe_from_data(_read(path), str(path))


def passes_from_specs(specs: Sequence[Any]) -> list[Pass]:
    """Pass objects from a mix of Pass instances, ``"name:key=value"`` strings and
    ``(name, options)`` pairs (what the Python API accepts)."""
    out = []
    for i, spec in enumerate(specs):
        if isinstance(spec, Pass):
            out.append(spec)
        elif isinstance(spec, tuple) and len(spec) == 2:
            out.append(build_pass(spec[0], spec[1]))
        else:
            out.append(_entry_to_pass(spec, f"passes[{i}]"))
    return out
