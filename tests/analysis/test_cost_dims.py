"""MACs per symbolic dim: the polynomial in the dynamic dims that ``count_cost`` follows, for
an attention block (``seq²``) and a strided CNN (``H·W``), checked against counts at sizes
the fit never saw; refusals carry a reason; ``inspect`` prints the formula."""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphopt.analysis.cost import count_cost
from graphopt.analysis.cost_dims import macs_formula
from graphopt.cli.commands import main

D, F = 8, 24


def _attention() -> onnx.ModelProto:
    """x[batch, seq, 8] -> Q,K,V -> softmax(QKᵀ)V -> Wo -> W1 -> relu -> W2 -> y"""
    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def w(name, shape):
        inits.append(numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name))
        return name

    for n in ("q", "k", "v"):
        nodes.append(helper.make_node("MatMul", ["x", w("w" + n, (D, D))], [n]))
    nodes += [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
              helper.make_node("MatMul", ["q", "kt"], ["s"]),
              helper.make_node("Softmax", ["s"], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", "v"], ["c"]),
              helper.make_node("MatMul", ["c", w("wo", (D, D))], ["a"]),
              helper.make_node("MatMul", ["a", w("w1", (D, F))], ["h"]),
              helper.make_node("Relu", ["h"], ["r"]),
              helper.make_node("MatMul", ["r", w("w2", (F, D))], ["y"])]
    graph = helper.make_graph(
        nodes, "attn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", D])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _cnn(dims=("n", 3, "h", "w")) -> onnx.ModelProto:
    """image[n, 3, h, w] -> Conv 3x3 stride 2 (8) -> Relu -> Conv 3x3 (16) -> y"""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((16, 8, 3, 3)).astype(np.float32), "w2")
    nodes = [helper.make_node("Conv", ["image", "w1"], ["c1"], pads=[1] * 4, strides=[2, 2]),
             helper.make_node("Relu", ["c1"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1] * 4)]
    graph = helper.make_graph(
        nodes, "cnn", [helper.make_tensor_value_info("image", TensorProto.FLOAT, list(dims))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w1, w2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_attention_macs_are_linear_and_quadratic_in_seq():
    """Projections and FFN cost (4·D² + 2·D·F) per token, scores and context 2·D per token
    pair: exactly those two terms, and the formula equals the count at batch 3, seq 7."""
    formula = macs_formula(_attention())
    assert formula.reason == ""
    terms = {tuple(sorted(m.items())): c for c, m in formula.terms}
    assert terms.keys() == {(("batch", 1), ("seq", 1)), (("batch", 1), ("seq", 2))}
    assert np.isclose(terms[(("batch", 1), ("seq", 1))], 4 * D * D + 2 * D * F)
    assert np.isclose(terms[(("batch", 1), ("seq", 2))], 2 * D)
    assert formula.evaluate({"batch": 3, "seq": 7}) == count_cost(
        _attention(), {"x": (3, 7, D)}).macs
    assert formula.text() == "16·batch·seq² + 640·batch·seq"


def test_cnn_macs_per_pixel():
    """Both convs scale with n·h·w (stride 2 quarters the first one's output): one term,
    equal to the count at 2 x 3 x 64 x 96; a dim fixed by input_shapes is no variable."""
    formula = macs_formula(_cnn())
    assert [m for _, m in formula.terms] == [{"n": 1, "h": 1, "w": 1}]
    assert formula.evaluate({"n": 2, "h": 64, "w": 96}) == count_cost(
        _cnn(), {"image": (2, 3, 64, 96)}).macs
    assert macs_formula(_cnn(), {"image": (1, 3, 64, 64)}) is None


def test_unnamed_and_too_many_dims():
    """Unnamed dynamic axes are one variable each, named by input and axis; more than three
    variables give a reason instead of 81 shape inferences."""
    formula = macs_formula(_cnn(("n", 3, "?", None)))
    assert set(formula.variables) == {"n", "image[2]", "image[3]"} and not formula.reason
    many = _cnn(("n", "c", "h", "w"))
    many.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "c"
    refused = macs_formula(many)
    assert not refused.terms and "4 dynamic dims" in refused.reason


def test_inspect_prints_the_formula(tmp_path, capsys):
    """inspect: the formula line in the table and in --json (cost.macs_formula)."""
    path = tmp_path / "attn.onnx"
    path.write_bytes(_attention().SerializeToString())
    assert main(["inspect", str(path)]) == 0
    assert "MACs = 16·batch·seq² + 640·batch·seq" in capsys.readouterr().out
    assert main(["inspect", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["cost"]["macs_formula"]["text"] == "16·batch·seq² + 640·batch·seq"
    assert data["cost"]["macs_formula"]["variables"] == {"batch": ["x[0]"], "seq": ["x[1]"]}
