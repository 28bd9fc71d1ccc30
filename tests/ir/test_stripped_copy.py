"""stripped_copy: a weight-less copy for analysis that never touches the model's bytes."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphopt.analysis.shapes import infer_shapes, tensor_shapes
from graphopt.ir.strip import stripped_copy
from graphopt.testing import make_model


def _model() -> onnx.ModelProto:
    """x -> MatMul(w: 64x64, large) -> Add(b: 64, small) -> Add(Constant c: 64x64, large) -> y"""
    rng = np.random.default_rng(0)
    c = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "c")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Add", ["h", "b"], ["g"]),
             helper.make_node("Constant", [], ["c"], value=c),
             helper.make_node("Add", ["g", "c"], ["y"])]
    return make_model(nodes, {"x": [64, 64]}, ["y"],
                      {"w": rng.standard_normal((64, 64)).astype(np.float32),
                       "b": rng.standard_normal(64).astype(np.float32)})


def test_large_tensors_lose_bytes_only():
    """Large initializer and Constant tensor keep name/type/dims without data; small stay."""
    model = _model()
    work = stripped_copy(model)
    inits = {t.name: t for t in work.graph.initializer}
    assert not inits["w"].HasField("raw_data")
    assert list(inits["w"].dims) == [64, 64] and inits["w"].data_type == onnx.TensorProto.FLOAT
    np.testing.assert_array_equal(numpy_helper.to_array(inits["b"]),
                                  numpy_helper.to_array(model.graph.initializer[1]))
    assert not work.graph.node[2].attribute[0].t.HasField("raw_data")
    assert work.opset_import == model.opset_import and work.ir_version == model.ir_version
    assert [n.op_type for n in work.graph.node] == [n.op_type for n in model.graph.node]


def test_initializers_only_keeps_constant_nodes():
    """initializers_only=True leaves Constant nodes' tensors whole."""
    work = stripped_copy(_model(), initializers_only=True)
    assert work.graph.node[2].attribute[0].t.HasField("raw_data")
    assert not work.graph.initializer[0].HasField("raw_data")


def test_model_is_left_unchanged():
    """stripped_copy, infer_shapes and tensor_shapes leave the model's weights as they were."""
    model = _model()
    before = model.SerializeToString()
    stripped_copy(model)
    tensor_shapes(model)
    assert model.SerializeToString() == before
    infer_shapes(model)
    assert [t.raw_data for t in model.graph.initializer] == [
        t.raw_data for t in onnx.load_from_string(before).graph.initializer]


def test_shapes_without_importing_torch():
    """Shape inference loads ORT's symbolic inference without importing torch."""
    code = ("import sys; from graphopt.analysis.shapes import _symbolic_class; "
            "_symbolic_class(); assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
