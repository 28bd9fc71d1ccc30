"""Recipes: YAML/JSON files naming passes, validated with clear errors."""

from __future__ import annotations

import json

import pytest

from graphopt.errors import ConfigError
from graphopt.core.recipe import load_recipe


def _write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_recipe_forms(tmp_path):
    """Bare names, mappings with name, and {name: options} all give passes in order."""
    path = _write(tmp_path, "input_shapes: {x: [1, 3, 8, 8]}\non_error: continue\npasses:\n"
                            "  - cleanup\n  - name: fold-pad\n  - fold-batchnorm: {}\n")
    recipe = load_recipe(path)
    assert [p.name for p in recipe.passes] == ["cleanup", "fold-pad", "fold-batchnorm"]
    assert recipe.input_shapes == {"x": (1, 3, 8, 8)} and recipe.on_error == "continue"


def test_json_recipe(tmp_path):
    """A JSON recipe reads the same way."""
    path = _write(tmp_path, json.dumps({"passes": [{"name": "cleanup"}]}), "r.json")
    assert [p.name for p in load_recipe(path).passes] == ["cleanup"]


@pytest.mark.parametrize("text, message", [
    ("passes: [nope]", "unknown pass 'nope'"),
    ("passes: [{name: cleanup, bogus: 1}]", "unknown option 'bogus'"),
    ("passes: []", "non-empty list"),
    ("pases: [cleanup]", "unknown key 'pases'"),
    ("passes: [cleanup]\non_error: maybe", "on_error"),
    ("passes: [cleanup\n", "invalid YAML"),
    ("passes: [{name: 3}]", "must be a string"),
    ("input_shapes: {x: [a]}\npasses: [cleanup]", "list of integers"),
])
def test_recipe_errors(tmp_path, text, message):
    """Each kind of mistake is a ConfigError naming the file and what is wrong."""
    with pytest.raises(ConfigError, match=message):
        load_recipe(_write(tmp_path, text))


def test_recipe_missing(tmp_path):
    """A recipe path that does not exist is a ConfigError."""
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(tmp_path / "none.yaml")


def test_recipe_wrong_type_and_range(tmp_path):
    """Option types and ranges are checked by the pass's config dataclass."""
    with pytest.raises(ConfigError, match="passes\\[0\\]"):
        load_recipe(_write(tmp_path, "passes: [{name: cleanup, fold_constants: maybe}]"))
