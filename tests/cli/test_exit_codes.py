"""Exit codes of ``graphopt optimize``: 1 for a pass rolled back after verification (as the
README says), 2 for the user's config or input problem found by a pass, nothing written."""

from __future__ import annotations

from onnx import helper

import graphopt
from graphopt.cli.commands import main
from graphopt.core.contract import Pass, PassResult
from graphopt.core.registry import register
from graphopt.errors import ConfigError
from graphopt.testing import make_model

@register
class _BreaksOutputs(Pass):
    """Lossless by its claim, but it negates the output: verification rolls it back."""

    name = "breaks-outputs-exit-test"

    def run(self, model, ctx):
        model.graph.node[-1].op_type = "Neg"
        return PassResult(model, modified=True)

@register
class _BadOption(Pass):
    """A config problem only found while running (like an index out of range)."""
    name = "bad-option-exit-test"
    def run(self, model, ctx):
        raise ConfigError("index 5 is out of range: the model has 0..2")

def _model(tmp_path):
    """x -> Relu -> y."""
    path = tmp_path / "m.onnx"
    graphopt.save(make_model([helper.make_node("Relu", ["x"], ["y"])], {"x": [2, 3]}, ["y"]),
                  path)
    return path

def _optimize(tmp_path, capsys, pass_name: str):
    """``graphopt optimize`` with one pass: (exit code, error lines, whether -o was written)."""
    out = tmp_path / "o.onnx"
    code = main(["optimize", str(_model(tmp_path)), "-o", str(out), "--pass", pass_name])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    return code, lines, out.exists()


def test_rolled_back_pass_exits_1(tmp_path, capsys):
    """The pass fails the lossless check: one error line, exit 1, no output file."""
    code, lines, written = _optimize(tmp_path, capsys, "breaks-outputs-exit-test")
    assert code == 1 and not written
    assert len(lines) == 1 and "changed the outputs of a lossless pass" in lines[0]


def test_config_problem_found_by_a_pass_exits_2(tmp_path, capsys):
    """A ConfigError raised inside a pass is the user's error: exit 2, one line, nothing
    written."""
    code, lines, written = _optimize(tmp_path, capsys, "bad-option-exit-test")
    assert code == 2 and not written
    assert len(lines) == 1 and "index 5 is out of range" in lines[0]


def test_rolled_back_pass_is_one_stderr_line(tmp_path):
    """In a real process (logging configured by the CLI), a pass rolled back with
    ``--on-error stop`` shows exactly one stderr line, the ``error:`` line: no warning
    from the manager before it."""
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(
        "import sys\n"
        "from graphopt.cli.commands import main\n"
        "from graphopt.core.contract import Pass, PassResult\n"
        "from graphopt.core.registry import register\n"
        "@register\n"
        "class Breaks(Pass):\n"
        "    name = 'breaks-outputs-subprocess'\n"
        "    def run(self, model, ctx):\n"
        "        model.graph.node[-1].op_type = 'Neg'\n"
        "        return PassResult(model, modified=True)\n"
        "sys.exit(main(sys.argv[1:]))\n")
    out = tmp_path / "o.onnx"
    proc = subprocess.run([sys.executable, str(script), "optimize", str(_model(tmp_path)),
                           "-o", str(out), "--pass", "breaks-outputs-subprocess"],
                          capture_output=True, text=True, timeout=120, check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and not out.exists()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
