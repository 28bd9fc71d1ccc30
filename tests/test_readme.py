"""The README's Python examples run as written, on a small CNN saved as ``model.onnx`` with
the input name and shape they use."""

from __future__ import annotations

import re
from pathlib import Path

import graphopt
from graphopt.testing import tiny_cnn

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.M | re.S)


def test_readme_python_examples_run(tmp_path, monkeypatch, capsys):
    """Every ```python block executes without error, in a folder holding model.onnx."""
    blocks = _python_blocks()
    assert blocks, "the README has no Python example"
    graphopt.save(tiny_cnn(size=224), tmp_path / "model.onnx")
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        namespace: dict = {}
        exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - our own README
    assert (tmp_path / "model.opt.onnx").is_file()
    assert "True" in capsys.readouterr().out  # report.validation.ok printed by the example
