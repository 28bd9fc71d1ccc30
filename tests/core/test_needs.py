"""Needs declared as data (``Pass.requires``): the manager checks them before any pass runs;
an unmet one is one error line and exit 2 from the CLI, with no pass run, nothing written."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

import graphopt
from graphopt.cli.commands import main
from graphopt.core.contract import Context, Pass, PassResult
from graphopt.core.manager import PassManager
from graphopt.core.needs import Need
from graphopt.core.registry import register
from graphopt.errors import ConfigError, InputSpecError, UnsupportedModelError
from graphopt.testing import make_model

RAN: list[str] = []


class _Records(Pass):
    """Records that it ran (so a test can see that nothing ran)."""

    name = "records-needs-test"

    def run(self, model, ctx):
        RAN.append(self.name)
        return PassResult(model, modified=False)


@register
class _NeedsData(_Records, name="needs-data-test", lossless=True):
    requires = (Need.CALIBRATION,)


class _NeedsShapes(_Records, name="needs-shapes-test", lossless=True):
    requires = (Need.CONCRETE_SHAPES,)


class _NeedsFloat(_Records, name="needs-float-test", lossless=True):
    requires = (Need.FLOAT_MODEL,)


def _relu(dims=("batch", 3)):
    return make_model([helper.make_node("Relu", ["x"], ["y"])], {"x": list(dims)}, ["y"])


def _run(passes, model, ctx=None):
    RAN.clear()
    return PassManager(passes).run(model, ctx or Context())


def test_unmet_calibration_stops_the_run_before_any_pass():
    """The first pass has no needs, the second needs data: neither runs."""
    with pytest.raises(ConfigError, match="needs-data-test' needs calibration data"):
        _run([_Records(), _NeedsData()], _relu())
    assert RAN == []
    feeds = [{"x": np.ones((2, 3), np.float32)}]
    _run([_Records(), _NeedsData()], _relu(), Context(calibration=feeds))
    assert RAN == ["records-needs-test", "needs-data-test"]


def test_concrete_shapes_from_the_model_or_the_context():
    with pytest.raises(InputSpecError, match=r"concrete input shapes: x\[0\] unknown"):
        _run([_NeedsShapes()], _relu())
    assert RAN == []
    _run([_NeedsShapes()], _relu(), Context(input_shapes={"x": (2, 3)}))
    _run([_NeedsShapes()], _relu((2, 3)))
    assert RAN == ["needs-shapes-test"]


def test_float_model_refuses_a_quantized_one():
    w = np.ones((3, 3), np.int8)
    model = make_model([helper.make_node("DequantizeLinear", ["w", "s"], ["d"]),
                        helper.make_node("MatMul", ["x", "d"], ["y"])],
                       {"x": [2, 3]}, ["y"], {"w": w, "s": np.float32(0.5)})
    with pytest.raises(UnsupportedModelError, match="already quantized .*DequantizeLinear"):
        _run([_NeedsFloat()], model)
    assert RAN == []


def test_cli_unmet_need_is_one_line_exit_2_nothing_written(tmp_path, capsys):
    path, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    graphopt.save(_relu((2, 3)), path)
    code = main(["optimize", str(path), "-o", str(out), "--pass", "needs-data-test"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and not out.exists()
    assert lines == ["error: pass 'needs-data-test' needs calibration data (give "
                     "--calibration DIR)"]
