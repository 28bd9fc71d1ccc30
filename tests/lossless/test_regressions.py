"""Named regressions for issue 13 (lossless means lossless) and issue 9 items 1-2.

Each test builds the smallest model that shows one class of failure found by fuzzing, runs
the lossless passes through ``graphopt.optimize`` (the manager: finalize, checker, ORT load,
numeric check) and checks what a user sees: outputs equal to the input model's at several
input sizes (including the smallest the model accepts), the interface unchanged, and no
rollback of a model onnxruntime and the checker accept.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.testing import make_model, run

F32 = np.float32
RNG = np.random.default_rng(0)


def _optimize(model, passes, **kw):
    out, report = graphopt.optimize(model, passes, on_error="continue", **kw)
    return out, report


def _statuses(report) -> dict[str, str]:
    return {p.name: p.status for p in report.passes}


def _same_outputs(a, b, feeds_list, atol=1e-5):
    for feeds in feeds_list:
        want = run(a, feeds)
        got = run(b, feeds)
        assert set(want) == set(got)
        for name in want:
            assert want[name].shape == got[name].shape, (name, feeds_shapes(feeds))
            np.testing.assert_allclose(got[name], want[name], atol=atol, rtol=1e-5,
                                       err_msg=f"{name} at {feeds_shapes(feeds)}")


def feeds_shapes(feeds):
    return {k: v.shape for k, v in feeds.items()}


def _images(shapes, name="x"):
    return [{name: RNG.standard_normal(s).astype(F32)} for s in shapes]


# --------------------------------------------------------------------------- class 1: fold-pad


def _dilated_maxpool():
    """x [1, 2, H, W] -> Relu -> Pad(1 on H/W) -> MaxPool(kernel 2, dilation 2) -> y."""
    pads = np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)
    return make_model([helper.make_node("Relu", ["x"], ["r"]),
                       helper.make_node("Pad", ["r", "pads"], ["p"]),
                       helper.make_node("MaxPool", ["p"], ["y"], kernel_shape=[2, 2],
                                        dilations=[2, 2])],
                      {"x": [1, 2, "H", "W"]}, ["y"], {"pads": pads})


def test_fold_pad_dilated_maxpool_pad_only_window_at_small_height():
    """Relu -> Pad(1 on H/W) -> MaxPool(kernel 2, dilation 2) on [1, 2, H, W]: at H = 1 a
    dilated window covers only padding, so the fold is skipped (it was folded and gave
    -3.4e38 there; the 16x16 numeric check never saw it)."""
    model = _dilated_maxpool()
    out, report = _optimize(model, ["fold-pad"])
    assert _statuses(report) == {"fold-pad": "unchanged"}
    reasons = [s.reason for s in report.passes[0].skipped]
    assert any("covers only padding" in r for r in reasons), reasons
    _same_outputs(model, out, _images([(1, 2, 1, 1), (1, 2, 1, 4), (1, 2, 16, 16)]))


def test_fold_pad_sigmoid_negative_value_dilated_width():
    """Sigmoid -> Pad(value -1, 1 on W) -> MaxPool(kernel [1,2], dilation [1,3]): at W = 2
    a window holds padding alone; skipped. With a static W of 16 the same fold is legal."""
    pads = np.array([0, 0, 0, 1, 0, 0, 0, 1], np.int64)
    nodes = [helper.make_node("Sigmoid", ["x"], ["r"]),
             helper.make_node("Pad", ["r", "pads", "v"], ["p"]),
             helper.make_node("MaxPool", ["p"], ["y"], kernel_shape=[1, 2], dilations=[1, 3])]
    inits = {"pads": pads, "v": np.array(-1.0, F32)}
    dynamic = make_model(nodes, {"x": [1, 2, "H", "W"]}, ["y"], inits)
    out, report = _optimize(dynamic, ["fold-pad"])
    assert _statuses(report) == {"fold-pad": "unchanged"}
    _same_outputs(dynamic, out, _images([(1, 2, 3, 2), (1, 2, 1, 5), (1, 2, 8, 16)]))
    static = make_model(nodes, {"x": [1, 2, 4, 16]}, ["y"], inits)
    out, report = _optimize(static, ["fold-pad"])
    assert report.passes[0].counters["pads_folded"] == 1
    _same_outputs(static, out, _images([(1, 2, 4, 16)]))


def test_fold_pad_maxpool_ceil_mode_window_count():
    """Relu -> Pad(end 2 on W) -> MaxPool(kernel 2, stride 2, ceil_mode) : onnxruntime's
    ceil_mode drops a last window that starts past input + begin pad, which differs between
    the explicit and the folded forms at odd widths; skipped, with the reason."""
    pads = np.array([0, 0, 0, 0, 0, 0, 0, 1], np.int64)
    model = make_model([helper.make_node("Relu", ["x"], ["r"]),
                        helper.make_node("Pad", ["r", "pads"], ["p"]),
                        helper.make_node("MaxPool", ["p"], ["y"], kernel_shape=[2, 2],
                                         strides=[2, 2], ceil_mode=1)],
                       {"x": [1, 2, 4, "W"]}, ["y"], {"pads": pads})
    out, report = _optimize(model, ["fold-pad"])
    _same_outputs(model, out, _images([(1, 2, 4, w) for w in (1, 2, 3, 4, 5, 6)]))


def test_fold_pad_lppool_and_avgpool_count_include_pad():
    """Pad(0) -> LpPool and Pad(0) -> AveragePool(count_include_pad=1, ceil_mode) fold and
    stay exact at every small width; AveragePool(count_include_pad=0) is skipped."""
    pads = np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)
    for op, attrs, folds in (("LpPool", {"p": 2}, True),
                             ("AveragePool", {"count_include_pad": 1, "ceil_mode": 1}, True),
                             ("AveragePool", {"count_include_pad": 0}, False)):
        model = make_model([helper.make_node("Pad", ["x", "pads"], ["p"]),
                            helper.make_node(op, ["p"], ["y"], kernel_shape=[3, 3],
                                             strides=[2, 2], **attrs)],
                           {"x": [1, 2, "H", "W"]}, ["y"], {"pads": pads}, opset=19)
        out, report = _optimize(model, ["fold-pad"])
        assert report.passes[0].counters["pads_folded"] == int(folds), (op, attrs)
        _same_outputs(model, out, _images([(1, 2, h, w) for h, w in ((1, 1), (2, 3), (5, 6))]))


# --------------------------------------------------------------------------- class 2: declared shapes


def test_proven_shapes_ignore_value_info():
    """A stale value_info (1x2x4x4 on a dynamic tensor) is a hint: proven shapes keep the
    dims dynamic, so no pass folds a Shape or judges a window from it."""
    from graphopt.analysis.facts import proven_shapes

    model = make_model([helper.make_node("Relu", ["x"], ["r"])], {"x": [1, 2, "H", "W"]}, ["r"])
    model.graph.value_info.append(helper.make_tensor_value_info("r", TensorProto.FLOAT,
                                                                [1, 2, 4, 4]))
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("r", TensorProto.FLOAT,
                                                                 [1, 2, 4, 4]))
    assert proven_shapes(model)["r"] == (1, 2, None, None)


def test_cleanup_never_folds_shape_from_stale_graph_output():
    """Shape of a tensor whose graph-output declaration (1x2x4x4) is stale on a dynamic
    model: cleanup keeps the Shape node (it folded it into the constant [1, 2, 4, 4])."""
    model = make_model([helper.make_node("Relu", ["x"], ["r"]),
                        helper.make_node("Shape", ["r"], ["s"]),
                        helper.make_node("Cast", ["s"], ["y"], to=TensorProto.FLOAT)],
                       {"x": [1, 2, "H", "W"]}, ["y", "r"])
    model.graph.output[1].CopyFrom(helper.make_tensor_value_info("r", TensorProto.FLOAT,
                                                                 [1, 2, 4, 4]))
    out, report = _optimize(model, ["cleanup"])
    assert "Shape" in [n.op_type for n in out.graph.node]
    assert report.passes[0].counters["constants_folded"] == 0


# --------------------------------------------------------------------------- class 4: interface


def test_overridable_initializer_stays_an_input_and_a_variable():
    """``w`` is an initializer also listed as a graph input (a default the caller may
    override). After cleanup changed the model (an Identity removed), ``w`` is still an
    input, feeding it still works, and Mul(w, 2) was not folded from the default."""
    w = RNG.standard_normal((1, 2, 1, 1)).astype(F32)
    model = make_model([helper.make_node("Identity", ["x"], ["i"]),
                        helper.make_node("Mul", ["w", "two"], ["w2"]),
                        helper.make_node("Mul", ["i", "w2"], ["y"])],
                       [("x", [1, 2, "H", "W"], TensorProto.FLOAT),
                        ("w", [1, 2, 1, 1], TensorProto.FLOAT)], ["y"],
                       {"w": w, "two": np.array(2.0, F32)})
    out, report = _optimize(model, ["cleanup", "fold-batchnorm", "fold-pad"])
    assert report.ok and report.passes[0].status == "changed"
    assert [i.name for i in out.graph.input] == ["x", "w"]
    assert "w" in {t.name for t in out.graph.initializer}
    x = RNG.standard_normal((1, 2, 3, 3)).astype(F32)
    other = np.full((1, 2, 1, 1), 3.0, F32)
    _same_outputs(model, out, [{"x": x}, {"x": x, "w": other}])


# --------------------------------------------------------------------------- class 5-7: rolled back


def _branch(name, nodes, outputs, inits=()):
    return helper.make_graph(nodes, name, [], outputs, list(inits))


def test_cleanup_keeps_nodes_read_only_inside_if_branches():
    """``a = Relu(x)`` is read only by the If's branches (outer-scope reference): cleanup
    keeps it, before the If, and the checker accepts the result (it dropped or misordered
    it and the run was rolled back)."""
    then_g = _branch("then", [helper.make_node("Neg", ["a"], ["t"])],
                     [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    else_g = _branch("else", [helper.make_node("Identity", ["a"], ["e"])],
                     [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["c"]),
             helper.make_node("If", ["c"], ["y0"], then_branch=then_g, else_branch=else_g),
             helper.make_node("Identity", ["y0"], ["y"]),
             helper.make_node("Relu", ["x"], ["a"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [2, 3])],
                              [helper.make_tensor_value_info("y", 1, [2, 3])],
                              [numpy_helper.from_array(np.array(0.0, F32), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    out, report = _optimize(model, ["cleanup"])
    assert report.ok, report.passes[0].error
    onnx.checker.check_model(out)
    _same_outputs(model, out, [{"x": np.abs(RNG.standard_normal((2, 3))).astype(F32)},
                               {"x": -np.abs(RNG.standard_normal((2, 3))).astype(F32)}])


def test_local_function_and_if_subgraph_pass_cleanup():
    """A model-local function called next to an If: onnx-graphsurgeon 0.6.1's
    ``get_used_funcs`` recursed without end ("maximum recursion depth exceeded"), so every
    pass was rolled back. Cleanup now runs and outputs match."""
    fn = helper.make_function("local", "Twice", ["a"], ["b"],
                              [helper.make_node("Add", ["a", "a"], ["b"])],
                              [helper.make_opsetid("", 17)])
    then_g = _branch("then", [helper.make_node("Twice", ["x"], ["t"], domain="local")],
                     [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    else_g = _branch("else", [helper.make_node("Neg", ["x"], ["e"])],
                     [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["c"]),
             helper.make_node("If", ["c"], ["i"], then_branch=then_g, else_branch=else_g),
             helper.make_node("Twice", ["i"], ["j"], domain="local"),
             helper.make_node("Identity", ["j"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [2, 3])],
                              [helper.make_tensor_value_info("y", 1, [2, 3])],
                              [numpy_helper.from_array(np.array(0.0, F32), "zero")])
    model = helper.make_model(graph, functions=[fn], opset_imports=[
        helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    out, report = _optimize(model, ["cleanup", "fold-batchnorm", "fold-pad"])
    assert report.ok, [p.error for p in report.passes]
    assert report.passes[0].status == "changed"
    assert [f.name for f in out.functions] == ["Twice"]
    _same_outputs(model, out, [{"x": np.abs(RNG.standard_normal((2, 3))).astype(F32)},
                               {"x": -np.abs(RNG.standard_normal((2, 3))).astype(F32)}])


def test_sparse_initializer_conv_weight_passes_cleanup():
    """A 64x64x1x1 Conv weight stored as a sparse initializer: the checker refused the
    result ("indices ... has 4096 values, but NNZ is 0"); now cleanup runs and matches."""
    dense = RNG.standard_normal((64, 64, 1, 1)).astype(F32)
    dense[np.abs(dense) < 1.0] = 0
    flat = dense.reshape(-1)
    nz = np.flatnonzero(flat)
    sparse = helper.make_sparse_tensor(
        numpy_helper.from_array(flat[nz], "w"),
        numpy_helper.from_array(nz.astype(np.int64), "w_indices"), list(dense.shape))
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["i"]), helper.make_node("Conv", ["i", "w"], ["y"])],
        "g", [helper.make_tensor_value_info("x", 1, [1, 64, "H", "W"])],
        [helper.make_tensor_value_info("y", 1, [1, 64, "H", "W"])], sparse_initializer=[sparse])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    out, report = _optimize(model, ["cleanup", "fold-batchnorm", "fold-pad"])
    assert report.ok, [p.error for p in report.passes]
    assert report.passes[0].status == "changed"
    assert out.graph.sparse_initializer[0].SerializeToString() == sparse.SerializeToString()
    _same_outputs(model, out, _images([(1, 64, 3, 5)]), atol=1e-4)


# --------------------------------------------------------------------------- class 8: normalized


def _tiny(nodes, outputs, opsets=(("", 17),)):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [2, 3])],
                              outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v)
                                                    for d, v in opsets])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("case", ["ai.onnx domain", "out of order", "output without shape"])
def test_inputs_ort_runs_but_checker_refuses_are_normalized(case):
    """Each model runs in onnxruntime but fails onnx.checker; optimize normalizes it up front
    (said in the report), so cleanup changes it instead of being rolled back."""
    y = helper.make_tensor_value_info("y", 1, [2, 3])
    relu, ident = (helper.make_node("Relu", ["x"], ["a"]),
                   helper.make_node("Identity", ["a"], ["y"]))
    if case == "ai.onnx domain":
        relu.domain = "ai.onnx"
        model = _tiny([relu, ident], [y], opsets=(("ai.onnx", 17),))
    elif case == "out of order":
        model = _tiny([ident, relu], [y])
    else:
        model = _tiny([relu, ident], [helper.make_tensor_value_info("y", 1, None)])
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model)
    out, report = _optimize(model, ["cleanup"])
    assert report.ok and report.passes[0].status == "changed", report.passes[0].error
    assert report.metadata["normalized"]
    onnx.checker.check_model(out)
    _same_outputs(model, out, [{"x": RNG.standard_normal((2, 3)).astype(F32)}])


def test_cycle_and_unknown_rank_output_refused_with_one_line(tmp_path):
    """A cycle cannot be sorted and an output of unknown rank cannot be declared: the CLI
    refuses before any work, one ``error:`` line, exit 2, nothing written."""
    from graphopt.cli.commands import main

    cyc = _tiny([helper.make_node("Add", ["x", "b"], ["a"]),
                 helper.make_node("Relu", ["a"], ["b"]),
                 helper.make_node("Identity", ["a"], ["y"])],
                [helper.make_tensor_value_info("y", 1, [2, 3])])
    path = tmp_path / "cycle.onnx"
    path.write_bytes(cyc.SerializeToString())
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(path), "-o", str(out), "--pass", "cleanup"]) == 2
    assert not out.exists()


# --------------------------------------------------------------------------- issue 9, item 1


def _rnn_branch(name, sign, rng):
    w = numpy_helper.from_array(rng.standard_normal((1, 16, 3)).astype(F32), f"{name}.rnn.weight_ih")
    r = numpy_helper.from_array(rng.standard_normal((1, 16, 16)).astype(F32) * 0.1,
                                f"{name}.rnn.weight_hh")
    nodes = [helper.make_node("Unsqueeze", ["x", "ax"], ["x3"]),
             helper.make_node("RNN", ["x3", w.name, r.name], ["", f"{name}_h"], hidden_size=16),
             helper.make_node("Mul", [f"{name}_h", "sign"], [f"{name}_out"])]
    inits = [w, r, numpy_helper.from_array(np.array(sign, F32), "sign")]
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(
        f"{name}_out", TensorProto.FLOAT, None)], inits)


def test_if_branch_weights_survive_every_lossless_pass_byte_for_byte():
    """A voice-activity-like model: If branches hold their own RNN weights (initializers of
    the branch graphs, over 4 KB each). cleanup, fold-batchnorm and fold-pad leave every
    branch tensor byte for byte as it was, and onnxruntime runs the result (it refused it:
    "should contain one and only one value field")."""
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["c"]),
             helper.make_node("Identity", ["x"], ["xi"]),
             helper.make_node("If", ["c"], ["h"], then_branch=_rnn_branch("then", 1.0, rng),
                              else_branch=_rnn_branch("else", -1.0, rng)),
             helper.make_node("Identity", ["h"], ["y"])]
    graph = helper.make_graph(nodes, "vad", [helper.make_tensor_value_info("x", 1, [2, 3])],
                              [helper.make_tensor_value_info("y", 1, [1, 2, 16])],
                              [numpy_helper.from_array(np.array(0.0, F32), "zero"),
                               numpy_helper.from_array(np.array([0], np.int64), "ax")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)

    def branch_tensors(m):
        return [t.SerializeToString() for n in m.graph.node for a in n.attribute
                if a.type == onnx.AttributeProto.GRAPH for t in a.g.initializer]

    out, report = _optimize(model, ["cleanup", "fold-batchnorm", "fold-pad"])
    assert report.ok and report.passes[0].status == "changed", report.passes[0].error
    assert branch_tensors(out) == branch_tensors(model)
    _same_outputs(model, out, [{"x": np.abs(rng.standard_normal((2, 3))).astype(F32)},
                               {"x": -np.abs(rng.standard_normal((2, 3))).astype(F32)}])


# --------------------------------------------------------------------------- issue 9, item 2


@pytest.mark.parametrize("shapeless_output", [False, True])
def test_dynamically_quantized_model_passes_lossless_passes(quantized_cnn, shapeless_output):
    """onnxruntime's dynamic quantizer's output (IR 6, opset 12, ConvInteger, MatMulInteger,
    DynamicQuantizeLinear, DynamicQuantizeLSTM, many domains imported) goes through cleanup,
    fold-batchnorm and fold-pad: nothing rolled back, quantized ops kept, outputs equal at
    two sizes. With its output declared without a shape (the checker's "Field 'shape' of
    'type' is required but missing") it is normalized first."""
    model = onnx.ModelProto()
    model.CopyFrom(quantized_cnn)
    ops = {n.op_type for n in model.graph.node}
    assert {"ConvInteger", "MatMulInteger", "DynamicQuantizeLinear",
            "DynamicQuantizeLSTM"} <= ops
    assert model.ir_version == 6
    if shapeless_output:
        model.graph.output[0].type.tensor_type.ClearField("shape")
    out, report = _optimize(model, ["cleanup", "fold-batchnorm", "fold-pad"])
    assert report.ok, [p.error for p in report.passes]
    assert {"ConvInteger", "MatMulInteger", "DynamicQuantizeLSTM"} <= {
        n.op_type for n in out.graph.node}
    onnx.checker.check_model(out)
    _same_outputs(model, out, _images([(1, 3, 8, 8), (1, 3, 5, 13)]), atol=0)


# --------------------------------------------------------------------------- class 3: unverified


def _stride32_detector():
    """x [1, 3, H, W] -> five MaxPool(2, stride 2) -> Resize x32 -> Concat with x ->
    Identity: runs only when H and W are multiples of 32 (as an FPN backbone does)."""
    nodes, prev = [], "x"
    for i in range(5):
        nodes.append(helper.make_node("MaxPool", [prev], [f"p{i}"], kernel_shape=[2, 2],
                                      strides=[2, 2]))
        prev = f"p{i}"
    nodes += [helper.make_node("Resize", [prev, "", "scales"], ["up"], mode="nearest"),
              helper.make_node("Concat", ["up", "x"], ["s"], axis=1),
              helper.make_node("Identity", ["s"], ["y"])]
    return make_model(nodes, {"x": [1, 3, "H", "W"]}, ["y"],
                      {"scales": np.array([1, 1, 32, 32], F32)})


def test_numeric_check_finds_sizes_a_stride32_model_runs():
    """The default 16x16 input cannot run a stride-32 model (the check was skipped and the
    run exited 0); the manager tries 1, 2, 3, 32 ... and checks at 32x32 and 96x96."""
    model = _stride32_detector()
    out, report = _optimize(model, ["cleanup"])
    entry = report.passes[0]
    assert entry.status == "changed" and report.ok
    assert entry.checked_at == ["x:1x3x32x32", "x:1x3x96x96"]
    _same_outputs(model, out, _images([(1, 3, 64, 32)]))


def test_pass_nothing_runs_is_unverified_and_cli_refuses_to_write(tmp_path):
    """Reshape to a fixed 1x3x7x7 runs only at 7x7, a size no generated input has: cleanup's
    change cannot be checked. The report says 'unverified' (table and JSON), the CLI exits 1
    and writes nothing; --allow-unverified writes it (exit 0); --input-shape x:1x3x7x7 lets
    it be verified."""
    import json

    from graphopt.cli.commands import main

    model = make_model([helper.make_node("Identity", ["x"], ["i"]),
                        helper.make_node("Reshape", ["i", "shape"], ["y"])],
                       {"x": [1, 3, "H", "W"]}, ["y"], {"shape": np.array([1, 3, 7, 7])})
    _, report = _optimize(model, ["cleanup"])
    assert report.passes[0].status == "unverified" and not report.ok
    assert "no input tried runs the model" in report.passes[0].unverified
    src, out, rep = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "r.json"
    src.write_bytes(model.SerializeToString())
    args = ["optimize", str(src), "-o", str(out), "--pass", "cleanup", "--report", str(rep)]
    assert main(args) == 1
    assert not out.exists()
    assert json.loads(rep.read_text())["unverified"] == ["cleanup"]
    assert main(args + ["--allow-unverified"]) == 0 and out.exists()
    assert json.loads(rep.read_text())["passes"][0]["status"] == "unverified"
    out.unlink()
    assert main(args + ["--input-shape", "x:1x3x7x7"]) == 0 and out.exists()
    assert json.loads(rep.read_text())["passes"][0]["checked_at"][0] == "x:1x3x7x7"


def test_manager_checks_small_sizes_when_a_pass_is_wrong(monkeypatch):
    """Second line of defence: with fold-pad's window check switched off, the dilated
    MaxPool fold is caught by the manager's check at the smallest size (1x1) and rolled
    back; the 16x16 check alone had passed it."""
    import graphopt.passes.pad as pad

    monkeypatch.setattr(pad, "axis_blocker", lambda *a, **k: None)
    model = _dilated_maxpool()
    out, report = _optimize(model, ["fold-pad"])
    assert report.passes[0].status == "rolled back"
    assert "changed the outputs" in report.passes[0].error
    assert "Pad" in [n.op_type for n in out.graph.node]


def test_ir3_initializer_missing_from_inputs_is_listed():
    """Fuzz seed 419: an IR-3 model (the onnx wheel's light squeezenet) with an added
    initializer not listed as a graph input runs in onnxruntime but fails the checker; it was
    written unchanged (exit 0, an output the checker refuses). Normalization lists it."""
    model = make_model([helper.make_node("Add", ["x", "b"], ["y"])], {"x": [1, 3]}, ["y"],
                       {"b": np.ones(3, F32)}, opset=9)
    model.ir_version = 3
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model)
    out, report = _optimize(model, ["fold-pad"])
    assert report.ok and "IR 3" in report.metadata["normalized"][0]
    onnx.checker.check_model(out)
    _same_outputs(model, out, [{"x": RNG.standard_normal((1, 3)).astype(F32)}])
