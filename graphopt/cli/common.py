"""Helpers every ``graphopt`` command shares: consoles, JSON, shapes, atomic text files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click


def _console(stderr: bool = False):
    from rich.console import Console

    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal:
        # Piped or captured output: rich would assume 80 columns and truncate names.
        console = Console(stderr=stderr, highlight=False, width=160)
    return console


def _shapes(values: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    from graphopt.ir.inputs import parse_input_shapes

    return parse_input_shapes(values)


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=_json_default))


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    return str(obj)


input_shape_option = click.option(
    "--input-shape", "input_shapes", multiple=True, metavar="NAME:DIMS",
    help="Concrete dims for an input, e.g. input_ids:8x128 (repeatable). Only for analysis "
         "and generated inputs: saved models keep their dynamic dims.",
)


def _write_text_atomic(path: Path, text: str) -> None:
    from graphopt.ir.model import _atomic_write

    folder = path.parent if str(path.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_write(folder, path, text.encode("utf-8"))
