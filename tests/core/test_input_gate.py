"""Inputs the checker or onnxruntime refuses for reasons normalization did not cover: repaired
when that is lossless (node names used twice), else refused before any pass runs with one
``error:`` line naming the input, not the first pass that changed something."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.cli.commands import main


def _model() -> onnx.ModelProto:
    """x[2, 8] -> MatMul(w) -> Add(b) -> Relu -> Identity -> y"""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 512)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(512).astype(np.float32), "b")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Add", ["h", "b"], ["hb"], name="add"),
             helper.make_node("Relu", ["hb"], ["a"], name="relu"),
             helper.make_node("Identity", ["a"], ["y"], name="id")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 512])], [w, b])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(tmp_path, model, capsys, *passes):
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    src.write_bytes(model.SerializeToString())
    args = ["optimize", str(src), "-o", str(out), "--json"]
    for p in passes or ("cleanup",):
        args += ["--pass", p]
    code = main(args)
    captured = capsys.readouterr()
    return code, out, captured


def test_duplicate_node_names_are_renamed(tmp_path, capsys):
    """Every node named "same": the checker passes it, onnxruntime refuses it ("two nodes with
    same node name"), and cleanup used to be rolled back for it. The names are made unique,
    the report says so, and the output runs and equals the input."""
    import json

    import onnxruntime as ort

    model = _model()
    for node in model.graph.node:
        node.name = "same"
    code, out, captured = _run(tmp_path, model, capsys)
    assert code == 0, captured.err
    normalized = json.loads(captured.out)["normalized"]
    assert any("node names used more than once" in line for line in normalized)
    names = [n.name for n in onnx.load(str(out)).graph.node]
    assert len(set(names)) == len(names) and names[0] == "same"
    x = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    reference = _model()
    want = ort.InferenceSession(reference.SerializeToString(),
                                providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def _truncate(name):
    def mutate(model):
        t = next(t for t in model.graph.initializer if t.name == name)
        t.raw_data = t.raw_data[: len(t.raw_data) // 2]
    return mutate


def _dangle(model):
    model.graph.node[2].input[0] = "nowhere"


@pytest.mark.parametrize("mutate, words", [
    (_truncate("b"), "initializer 'b' holds 1024 bytes, its dims [512] and type need 2048"),
    # 16 KB: above what the manager's weight-less checker copy keeps, so only the size
    # check sees it (onnxruntime refused it at the first pass's session).
    (_truncate("w"), "initializer 'w' holds 8192 bytes, its dims [8, 512] and type need 16384"),
    (_dangle, "input 'nowhere'"),
], ids=["truncated small", "truncated large", "dangling edge"])
def test_broken_input_refused_up_front(tmp_path, capsys, mutate, words):
    """One error line naming the input (not a pass), exit 2, nothing written."""
    model = _model()
    mutate(model)
    code, out, captured = _run(tmp_path, model, capsys, "cleanup", "prune-neurons:ratio=0.5")
    err = captured.err.strip().splitlines()
    assert code == 2 and not out.exists()
    assert len(err) == 1 and err[0].startswith("error: the input model is invalid"), err
    assert words in err[0] and "pass '" not in err[0]
