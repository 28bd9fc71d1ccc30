"""Tests for passes/cleanup.py: each builds the smallest graph showing one case."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.errors import ConfigError
from graphopt.core.contract import Context
from graphopt.core.manager import PassManager
from graphopt.core.registry import build_pass
from graphopt.passes.batchnorm import FoldBatchNorm
from graphopt.passes.cleanup import Cleanup, CleanupConfig
from graphopt.passes.pad import FoldPad
from graphopt.testing import (assert_equivalent, make_model, op_types, run_pass,
                              skip_reasons)

F32 = np.float32


def _run(model: onnx.ModelProto, **options):
    """Run cleanup on a copy; the result must pass the checker."""
    return run_pass(Cleanup(**options), model)


def _branch(name: str, nodes, output: str) -> onnx.GraphProto:
    out = helper.make_tensor_value_info(output, TensorProto.FLOAT, None)
    return helper.make_graph(nodes, name, [], [out])


# --------------------------------------------------------------------------- Identity/Dropout


def test_identity_chain_removed():
    """x -> Identity -> Identity -> Relu -> y: both Identities go, outputs bit-identical."""
    model = make_model([helper.make_node("Identity", ["x"], ["a"]),
                        helper.make_node("Identity", ["a"], ["b"]),
                        helper.make_node("Relu", ["b"], ["y"])], {"x": [2, 3]}, ["y"])
    result = _run(model)
    assert result.modified and result.counters["identities_removed"] == 2
    assert op_types(result.model) == ["Relu"]
    assert result.model.graph.node[0].input[0] == "x"
    assert_equivalent(model, result.model, atol=0, rtol=0)


def test_identity_to_graph_output_renames_producer():
    """Relu -> r -> Identity -> y (graph output), r also read by Neg: Relu now writes 'y'."""
    model = make_model([helper.make_node("Relu", ["x"], ["r"]),
                        helper.make_node("Identity", ["r"], ["y"]),
                        helper.make_node("Neg", ["r"], ["z"])], {"x": [4]}, ["y", "z"])
    result = _run(model)
    assert result.counters["identities_removed"] == 1
    assert op_types(result.model) == ["Relu", "Neg"]
    assert [o.name for o in result.model.graph.output] == ["y", "z"]
    assert list(result.model.graph.node[0].output) == ["y"]
    assert list(result.model.graph.node[1].input) == ["y"]
    assert_equivalent(model, result.model, atol=0, rtol=0)


def test_identity_graph_input_to_graph_output_kept():
    """x (graph input) -> Identity -> y (graph output): kept, both names are interface."""
    model = make_model([helper.make_node("Identity", ["x"], ["y"], name="id")], {"x": [4]}, ["y"])
    result = _run(model)
    assert not result.modified
    assert op_types(result.model) == ["Identity"]
    assert skip_reasons(result) == [
        "Identity kept: graph input 'x' passes straight to graph output 'y'; kept so both "
        "names stay"]


def test_identity_initializer_to_graph_output_kept():
    """Initializer w -> Identity -> y (graph output): kept with the initializer reason."""
    model = make_model([helper.make_node("Identity", ["w"], ["y"], name="id"),
                        helper.make_node("Relu", ["x"], ["z"])], {"x": [2]}, ["y", "z"],
                       {"w": np.ones(2, F32)})
    result = _run(model)
    assert op_types(result.model) == ["Identity", "Relu"]
    assert skip_reasons(result) == [
        "Identity kept: initializer 'w' passes straight to graph output 'y'; kept so both "
        "names stay"]


def test_identity_between_two_graph_outputs_kept():
    """Relu -> r (graph output) -> Identity -> y (graph output): both names must stay."""
    model = make_model([helper.make_node("Relu", ["x"], ["r"]),
                        helper.make_node("Identity", ["r"], ["y"], name="id")],
                       {"x": [2]}, ["r", "y"])
    result = _run(model)
    assert op_types(result.model) == ["Relu", "Identity"]
    assert skip_reasons(result) == [
        "Identity kept: both 'r' and 'y' are graph outputs; kept so both names stay"]


def test_two_identities_of_one_tensor_to_two_outputs():
    """r -> Identity -> y1 and r -> Identity -> y2 (outputs): r becomes y1, the second stays."""
    model = make_model([helper.make_node("Relu", ["x"], ["r"]),
                        helper.make_node("Identity", ["r"], ["y1"], name="id1"),
                        helper.make_node("Identity", ["r"], ["y2"], name="id2")],
                       {"x": [3]}, ["y1", "y2"])
    result = _run(model)
    assert result.counters["identities_removed"] == 1
    assert op_types(result.model) == ["Relu", "Identity"]
    assert list(result.model.graph.node[1].input) == ["y1"]
    assert skip_reasons(result) == ["Identity kept: 'r' already became graph output 'y1'; kept"]
    assert_equivalent(model, result.model, atol=0, rtol=0)


def test_dropout_removed_with_unused_mask():
    """Dropout (opset 13, ratio input, unread mask) in inference mode is an Identity."""
    model = make_model([helper.make_node("Dropout", ["x", "ratio"], ["d", "mask"]),
                        helper.make_node("Relu", ["d"], ["y"])], {"x": [2, 3]}, ["y"],
                       {"ratio": np.array(0.5, F32)}, opset=13)
    result = _run(model)
    assert result.counters["dropouts_removed"] == 1
    assert result.counters["initializers_removed"] == 1  # the ratio
    assert op_types(result.model) == ["Relu"]
    assert_equivalent(model, result.model, atol=0, rtol=0)


def test_dropout_with_used_mask_kept():
    """Dropout whose mask output is read: kept (the mask has no constant replacement)."""
    model = make_model([helper.make_node("Dropout", ["x"], ["y", "mask"], name="drop"),
                        helper.make_node("Cast", ["mask"], ["m"], to=TensorProto.FLOAT)],
                       {"x": [2]}, ["y", "m"], opset=13)
    result = _run(model)
    assert not result.modified
    assert skip_reasons(result) == ["Dropout kept: its mask output 'mask' is used"]


@pytest.mark.parametrize("mode,reason", [
    ("const", "Dropout kept: training_mode is true"),
    ("input", "Dropout kept: training_mode input 't' is not a constant"),
])
def test_dropout_in_training_mode_kept(mode, reason):
    """Dropout with training_mode true, or not known constant: kept, it is random."""
    inputs = [("x", [2], TensorProto.FLOAT)]
    inits = {"r": np.array(0.5, F32)}
    if mode == "const":
        inits["t"] = np.array(True)
    else:
        inputs.append(("t", [], TensorProto.BOOL))
    model = make_model([helper.make_node("Dropout", ["x", "r", "t"], ["y"], name="drop")],
                       inputs, ["y"], inits, opset=13)
    result = _run(model)
    assert op_types(result.model) == ["Dropout"]
    assert skip_reasons(result) == [reason]


def test_dropout_is_test_zero_kept():
    """Dropout (opset 6) with is_test=0 is the training form: kept."""
    model = make_model([helper.make_node("Dropout", ["x"], ["y"], is_test=0, name="drop")],
                       {"x": [2]}, ["y"], opset=6)
    result = _run(model)
    assert skip_reasons(result) == ["Dropout kept: is_test=0 (training mode)"]


# --------------------------------------------------------------------------- dead code


def test_dead_nodes_and_unused_initializers_removed():
    """x -> Neg -> Abs(+w) reaches no output; u is read by nothing: all removed."""
    model = make_model([helper.make_node("Relu", ["x"], ["y"]),
                        helper.make_node("Neg", ["x"], ["n"]),
                        helper.make_node("Add", ["n", "w"], ["dead"])], {"x": [2]}, ["y"],
                       {"w": np.ones(2, F32), "u": np.zeros(2, F32)})
    result = _run(model)
    assert result.counters["nodes_removed"] == 2
    assert result.counters["initializers_removed"] == 2
    assert op_types(result.model) == ["Relu"]
    assert not result.model.graph.initializer
    assert [i.name for i in result.model.graph.input] == ["x"]
    assert_equivalent(model, result.model, atol=0, rtol=0)


def test_unused_graph_input_kept():
    """A graph input nothing reads stays: the interface does not change."""
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], {"x": [2], "unused": [2]}, ["y"])
    result = _run(model)
    assert not result.modified
    assert [i.name for i in result.model.graph.input] == ["x", "unused"]


def _if_model() -> onnx.ModelProto:
    """Names read only inside If branches: initializer w, Constant c, Identity output i.

    ::

        x -> Relu -> r -> Identity -> i
        If(cond): then = i + w     else = x * c
    """
    then_g = _branch("then", [helper.make_node("Add", ["i", "w"], ["t"])], "t")
    else_g = _branch("else", [helper.make_node("Mul", ["x", "c"], ["e"])], "e")
    nodes = [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(
                 np.full(4, 3, F32))),
             helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Identity", ["r"], ["i"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)]
    return make_model(nodes, [("x", [4], TensorProto.FLOAT), ("cond", [], TensorProto.BOOL)],
                      ["y"], {"w": np.arange(4, dtype=F32)})


def _both_branches(reference, candidate):
    x = np.array([-1, 0.5, 2, -3], F32)
    for cond in (True, False):
        assert_equivalent(reference, candidate, {"x": x, "cond": np.array(cond)}, atol=0, rtol=0)


def test_names_read_only_inside_subgraph_kept():
    """If branches read w, c and i from the outer scope: none is removed as unused, and the
    Identity's removal renames i to r inside the then-branch."""
    model = _if_model()
    result = _run(model)
    assert result.counters["identities_removed"] == 1
    assert result.counters["nodes_removed"] == 0
    assert result.counters["initializers_removed"] == 0
    assert op_types(result.model) == ["Constant", "Relu", "If"]
    then_g = helper.get_node_attr_value(result.model.graph.node[2], "then_branch")
    assert list(then_g.node[0].input) == ["r", "w"]
    _both_branches(model, result.model)


def test_if_model_through_all_passes_intact():
    """The If model runs through cleanup, fold-batchnorm and fold-pad under the manager."""
    model = _if_model()
    before = onnx.ModelProto()
    before.CopyFrom(model)
    ctx = Context(calibration=[{"x": np.ones(4, F32), "cond": np.array(False)}])
    out, report = PassManager([Cleanup(), FoldBatchNorm(), FoldPad()]).run(model, ctx)
    assert report.ok
    assert "If" in op_types(out)
    _both_branches(before, out)


def test_loop_body_reading_outer_initializer_kept():
    """A Loop body adds outer initializer w each trip; w is read nowhere else and stays."""
    body = helper.make_graph(
        [helper.make_node("Add", ["acc", "w"], ["acc_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [3])])
    model = make_model([helper.make_node("Loop", ["trips", "", "x"], ["y"], body=body)],
                       {"x": [3]}, {"y": [3]}, {"trips": np.array(4, np.int64),
                                           "w": np.arange(3, dtype=F32)})
    result = _run(model)
    assert not result.modified
    assert {t.name for t in result.model.graph.initializer} == {"trips", "w"}
    assert_equivalent(model, result.model, atol=0, rtol=0)


def test_subgraph_is_not_optimized():
    """An Identity and a dead node inside a branch stay: cleanup edits the main graph only."""
    then_g = _branch("then", [helper.make_node("Identity", ["x"], ["t"]),
                              helper.make_node("Neg", ["x"], ["unused"])], "t")
    else_g = _branch("else", [helper.make_node("Neg", ["x"], ["e"])], "e")
    model = make_model([helper.make_node("If", ["cond"], ["y"], then_branch=then_g,
                                         else_branch=else_g)],
                       [("x", [4], TensorProto.FLOAT), ("cond", [], TensorProto.BOOL)], ["y"])
    result = _run(model)
    assert not result.modified
    assert result.model.graph.node[0] == model.graph.node[0]


# --------------------------------------------------------------------------- folding


def test_constant_subexpression_folded():
    """Constant c + initializer a -> Add -> Mul(x, .): the Add becomes one initializer."""
    nodes = [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(
                 np.full(3, 2, F32))),
             helper.make_node("Add", ["a", "c"], ["s"]),
             helper.make_node("Mul", ["x", "s"], ["y"])]
    model = make_model(nodes, {"x": [3]}, ["y"], {"a": np.arange(3, dtype=F32)})
    result = _run(model)
    assert result.counters["constants_folded"] == 1
    assert op_types(result.model) == ["Mul"]
    assert [t.name for t in result.model.graph.initializer] == ["s"]
    assert_equivalent(model, result.model, atol=0, rtol=0)


def test_static_shape_folded_dynamic_kept():
    """Shape of a static input becomes a constant; Shape of a dynamic one stays."""
    nodes = [helper.make_node("Shape", ["x"], ["sx"]),
             helper.make_node("Reshape", ["z", "sx"], ["y"]),
             helper.make_node("Shape", ["d"], ["sd"]),
             helper.make_node("Reshape", ["d", "sd"], ["w"])]
    model = make_model(nodes, {"x": [2, 3], "z": [6], "d": ["n", 3]}, ["y", "w"])
    result = _run(model)
    assert result.counters["constants_folded"] == 1
    assert op_types(result.model) == ["Reshape", "Shape", "Reshape"]
    assert numpy_helper.to_array(result.model.graph.initializer[0]).tolist() == [2, 3]
    assert_equivalent(model, result.model, atol=0, rtol=0)


def _tile_model() -> onnx.ModelProto:
    """A constant chain through a 1.6 MB Tile, read whole and through a small Slice.

    ::

        a, b -> Add -> ab -> Tile(x100000) -> big -> Slice[0:4] -> small -> Add(x) -> y
                                                 \\-> Add(xb) -> z
    """
    nodes = [helper.make_node("Add", ["a", "b"], ["ab"]),
             helper.make_node("Tile", ["ab", "reps"], ["big"]),
             helper.make_node("Slice", ["big", "s0", "s1"], ["small"]),
             helper.make_node("Add", ["x", "small"], ["y"]),
             helper.make_node("Add", ["xb", "big"], ["z"])]
    inits = {"a": np.ones(4, F32), "b": np.arange(4, dtype=F32),
             "reps": np.array([100_000], np.int64), "s0": np.array([0], np.int64),
             "s1": np.array([4], np.int64)}
    return make_model(nodes, {"x": [4], "xb": [400_000]}, ["y", "z"], inits)


def test_fold_over_size_cap_refused():
    """Tile to 1.6 MB is over the 1 MiB default: the Tile stays, with the reason; the Add
    before it and the small Slice of it still fold."""
    model = _tile_model()
    result = _run(model)
    assert op_types(result.model) == ["Tile", "Add", "Add"]
    assert result.counters["constants_folded"] == 2
    assert skip_reasons(result) == [
        "not folded: result 'big' would be 1600000 bytes, over max_fold_bytes=1048576 "
        "(raise it to fold anyway)"]
    assert_equivalent(model, result.model, atol=0, rtol=0)


def test_fold_size_cap_raised():
    """With max_fold_bytes raised past 1.6 MB the whole constant chain folds."""
    result = _run(_tile_model(), max_fold_bytes=4 << 20)
    assert op_types(result.model) == ["Add", "Add"]
    assert result.counters["constants_folded"] == 3
    assert not result.skipped


def test_multi_output_node_folds_whole():
    """Split of a constant folds into both outputs even though s2 feeds a Tile that is over
    the cap: the Tile reads the folded s2.

    ::

        c -> Split -> s1 -> Mul(x) -> y
                  \\-> s2 -> Tile(x100000) -> Add(xb) -> z
    """
    nodes = [helper.make_node("Split", ["c"], ["s1", "s2"], num_outputs=2, name="split"),
             helper.make_node("Mul", ["x", "s1"], ["y"]),
             helper.make_node("Tile", ["s2", "reps"], ["big"], name="tile"),
             helper.make_node("Add", ["xb", "big"], ["z"])]
    model = make_model(nodes, {"x": [4], "xb": [400_000]}, ["y", "z"],
                       {"c": np.arange(8, dtype=F32), "reps": np.array([100_000], np.int64)},
                       opset=18)
    result = _run(model)
    assert op_types(result.model) == ["Mul", "Tile", "Add"]
    assert {t.name for t in result.model.graph.initializer} == {"s1", "s2", "reps"}
    assert skip_reasons(result) == [
        "not folded: result 'big' would be 1600000 bytes, over max_fold_bytes=1048576 "
        "(raise it to fold anyway)"]
    assert_equivalent(model, result.model, atol=0, rtol=0)


def test_fold_constants_off():
    """fold_constants=False leaves constant subexpressions alone."""
    model = make_model([helper.make_node("Add", ["a", "a"], ["s"]),
                        helper.make_node("Mul", ["x", "s"], ["y"])], {"x": [2]}, ["y"],
                       {"a": np.ones(2, F32)})
    result = _run(model, fold_constants=False)
    assert not result.modified
    assert op_types(result.model) == ["Add", "Mul"]


@pytest.mark.parametrize("case,reason", [
    ("random", "not folded: RandomNormalLike is random; folding would freeze one sample"),
    ("quant", "not folded: DequantizeLinear kept so quantized weights stay quantized"),
    ("subgraph", "not folded: it has a subgraph (folding does not look inside subgraphs)"),
    ("output", "not folded: it produces a graph output, which stays computed rather than "
               "stored"),
    ("custom", "not folded: custom domain 'my.ops' that onnxruntime may not evaluate"),
    ("fails", "not folded: onnxruntime could not evaluate it"),
])
def test_fold_refusals(case, reason):
    """Each kind of node with constant inputs that is deliberately not folded."""
    inits = {"a": np.ones(4, F32)}
    outputs = ["y"]
    extra = None
    if case == "random":
        first = helper.make_node("RandomNormalLike", ["a"], ["k"], name="n")
    elif case == "quant":
        inits = {"q": np.ones(4, np.int8), "sc": np.array(0.5, F32)}
        first = helper.make_node("DequantizeLinear", ["q", "sc"], ["k"], name="n")
    elif case == "subgraph":
        inits["c"] = np.array(True)
        first = helper.make_node(
            "If", ["c"], ["k"], name="n",
            then_branch=_branch("t", [helper.make_node("Neg", ["a"], ["t"])], "t"),
            else_branch=_branch("e", [helper.make_node("Abs", ["a"], ["e"])], "e"))
    elif case == "output":
        first = helper.make_node("Neg", ["a"], ["k"], name="n")
        outputs = ["y", "k"]
    elif case == "custom":
        first = helper.make_node("Thing", ["a"], ["k"], name="n", domain="my.ops")
        extra = {"my.ops": 1}
    else:  # a Reshape onnxruntime refuses: 4 elements into shape [3]
        inits["shape"] = np.array([3], np.int64)
        first = helper.make_node("Reshape", ["a", "shape"], ["k"], name="n")
    model = make_model([first, helper.make_node("Add", ["x", "k"], ["y"])], {"x": [4]},
                       {o: [4] for o in outputs}, inits, extra_opsets=extra)
    result = _run(model)
    assert "n" in [n.name for n in result.model.graph.node]
    assert skip_reasons(result) == [reason]


def test_folder_failure_is_a_skip(monkeypatch):
    """If graphsurgeon itself fails, folding is reported as skipped; Identity removal and
    dead-code removal still happen."""
    import onnx_graphsurgeon as gs

    def broken(model):
        raise RuntimeError("cannot import")

    monkeypatch.setattr(gs, "import_onnx", broken)
    model = make_model([helper.make_node("Add", ["a", "a"], ["s"]),
                        helper.make_node("Identity", ["x"], ["i"]),
                        helper.make_node("Mul", ["i", "s"], ["y"])], {"x": [2]}, ["y"],
                       {"a": np.ones(2, F32)})
    result = _run(model)
    assert op_types(result.model) == ["Add", "Mul"]
    assert skip_reasons(result) == [
        "constant folding failed in onnx-graphsurgeon (RuntimeError: cannot import); the "
        "other cleanups still ran (run with fold_constants=false to skip folding)"]


def test_overridable_initializer_not_folded():
    """An initializer that is also a graph input is a default the user may override: the
    Add reading it stays, and the input stays."""
    model = make_model([helper.make_node("Add", ["a", "b"], ["s"]),
                        helper.make_node("Mul", ["x", "s"], ["y"])], {"x": [2]}, ["y"],
                       {"a": np.ones(2, F32), "b": np.ones(2, F32)})
    model.graph.input.append(helper.make_tensor_value_info("a", TensorProto.FLOAT, [2]))
    result = _run(model)
    assert op_types(result.model) == ["Add", "Mul"]
    assert [i.name for i in result.model.graph.input] == ["x", "a"]
    assert {t.name for t in result.model.graph.initializer} == {"a", "b"}


def test_ir3_model_keeps_initializers_listed_as_inputs():
    """IR 3 lists every initializer as an input: they still fold and are removed when unused,
    and the input list follows (folded value added, dropped ones gone)."""
    model = make_model([helper.make_node("Add", ["a", "b"], ["s"]),
                        helper.make_node("Mul", ["x", "s"], ["y"])], {"x": [2]}, ["y"],
                       {"a": np.ones(2, F32), "b": np.full(2, 2, F32), "u": np.zeros(2, F32)},
                       opset=8)
    for t in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, t.dims))
    model.ir_version = 3
    onnx.checker.check_model(model)
    result = _run(model)
    assert result.counters["constants_folded"] == 1
    assert op_types(result.model) == ["Mul"]
    assert [t.name for t in result.model.graph.initializer] == ["s"]
    assert [i.name for i in result.model.graph.input] == ["x", "s"]
    assert_equivalent(model, result.model, atol=0, rtol=0)


# --------------------------------------------------------------------------- duplicates


def test_duplicate_initializers_merged():
    """w1 == w2 (dtype, shape, bytes) merge; same bytes as int32 or another shape do not."""
    w = np.arange(4, dtype=F32)
    nodes = [helper.make_node("Add", ["x", "w1"], ["a"]),
             helper.make_node("Add", ["a", "w2"], ["b"]),
             helper.make_node("Reshape", ["w3", "shape"], ["w3r"]),
             helper.make_node("Add", ["b", "w3r"], ["c"]),
             helper.make_node("Cast", ["i"], ["ic"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["c", "ic"], ["y"])]
    inits = {"w1": w, "w2": w.copy(), "w3": w.reshape(2, 2), "i": w.view(np.int32),
             "shape": np.array([4], np.int64)}
    model = make_model(nodes, {"x": [4]}, ["y"], inits)
    result = _run(model, fold_constants=False)
    assert result.counters["initializers_deduplicated"] == 1
    assert [t.name for t in result.model.graph.initializer] == ["w1", "w3", "i", "shape"]
    assert list(result.model.graph.node[1].input) == ["a", "w1"]
    assert_equivalent(model, result.model, atol=0, rtol=0)


def test_duplicate_read_inside_subgraph_renamed():
    """A duplicate read only inside an If branch is renamed there to the kept copy."""
    w = np.arange(4, dtype=F32)
    then_g = _branch("then", [helper.make_node("Add", ["x", "w2"], ["t"])], "t")
    else_g = _branch("else", [helper.make_node("Mul", ["x", "w1"], ["e"])], "e")
    model = make_model([helper.make_node("If", ["cond"], ["y"], then_branch=then_g,
                                         else_branch=else_g)],
                       [("x", [4], TensorProto.FLOAT), ("cond", [], TensorProto.BOOL)], ["y"],
                       {"w1": w, "w2": w.copy()})
    result = _run(model)
    assert result.counters["initializers_deduplicated"] == 1
    assert [t.name for t in result.model.graph.initializer] == ["w1"]
    then_g = helper.get_node_attr_value(result.model.graph.node[0], "then_branch")
    assert list(then_g.node[0].input) == ["x", "w1"]
    _both_branches(model, result.model)


# --------------------------------------------------------------------------- pass-through


def test_com_microsoft_op_passes_through():
    """A com.microsoft Gelu survives cleanup (the Identity before it goes) and still runs."""
    model = make_model([helper.make_node("Identity", ["x"], ["i"]),
                        helper.make_node("Gelu", ["i"], ["y"], domain="com.microsoft")],
                       {"x": [2, 3]}, ["y"], extra_opsets={"com.microsoft": 1})
    result = _run(model)
    assert op_types(result.model) == ["Gelu"]
    assert result.model.graph.node[0].domain == "com.microsoft"
    assert_equivalent(model, result.model, atol=0, rtol=0)
    out, report = PassManager([Cleanup(), FoldBatchNorm(), FoldPad()]).run(result.model)
    assert report.ok and op_types(out) == ["Gelu"]


def test_model_fields_preserved_and_idempotent():
    """Producer, metadata and opsets survive; a second run finds nothing to do."""
    model = make_model([helper.make_node("Identity", ["x"], ["i"]),
                        helper.make_node("Relu", ["i"], ["y"])], {"x": [2]}, ["y"],
                       extra_opsets={"ai.onnx.ml": 3})
    model.producer_name = "unit-test"
    helper.set_model_props(model, {"author": "me"})
    result = _run(model)
    assert result.model.producer_name == "unit-test"
    assert {p.key: p.value for p in result.model.metadata_props} == {"author": "me"}
    assert {(o.domain, o.version) for o in result.model.opset_import} == {("", 17),
                                                                          ("ai.onnx.ml", 3)}
    again = _run(result.model)
    assert not again.modified and not again.skipped


def test_config_validation():
    """A negative max_fold_bytes is refused; options from the CLI are coerced."""
    with pytest.raises(ConfigError, match="max_fold_bytes must be >= 0"):
        CleanupConfig(max_fold_bytes=-1)
    p = build_pass("cleanup", {"fold_constants": "false", "max_fold_bytes": "2048"})
    assert p.config == CleanupConfig(fold_constants=False, max_fold_bytes=2048)


# --------------------------------------------------------------------------- a real export


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_torch_cnn_export_all_three_passes():
    """A torch CNN (Conv+BN+ReLU, ZeroPad2d before a Conv, F.pad before an AvgPool, Dropout,
    shared-value BN buffers the exporter ties with Identity), exported in eval mode without
    torch's own folding: the three passes leave Conv/Relu/AveragePool/Gemm, equal in ORT."""
    torch = pytest.importorskip("torch")
    nn, fn = torch.nn, torch.nn.functional

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.bn1 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
            self.pad, self.c2 = nn.ZeroPad2d(1), nn.Conv2d(8, 8, 3, bias=False)
            self.bn2, self.drop = nn.BatchNorm2d(8), nn.Dropout(0.5)
            self.pool, self.fc = nn.AvgPool2d(2), nn.Linear(8 * 7 * 7, 10)

        def forward(self, x):
            x = fn.relu(self.bn1(self.c1(x)))
            x = fn.relu(self.bn2(self.c2(self.pad(x))))
            x = self.pool(fn.pad(x, (1, 1, 1, 1)))
            return self.fc(self.drop(x.flatten(1)))

    torch.manual_seed(0)
    net = Net()
    for bn in (net.bn1, net.bn2):  # running_mean stays zero in both: exported as Identity
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-1, 1)
    net.eval()
    buf = io.BytesIO()
    torch.onnx.export(net, (torch.randn(1, 3, 14, 14),), buf, dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}},
                      do_constant_folding=False)
    model = onnx.load_from_string(buf.getvalue())
    original = onnx.ModelProto()
    original.CopyFrom(model)
    assert {"BatchNormalization", "Pad", "Identity"} <= set(op_types(model))

    out, report = PassManager([Cleanup(), FoldBatchNorm(), FoldPad()]).run(model, Context())
    assert report.ok, [p.error for p in report.passes]
    counters = {p.name: p.counters for p in report.passes}
    assert counters["cleanup"]["identities_removed"] >= 1
    assert counters["cleanup"]["constants_folded"] > 0
    assert counters["fold-batchnorm"]["batchnorms_folded"] == 2
    assert counters["fold-pad"]["pads_folded"] == 2
    assert op_types(out) == ["Conv", "Relu", "Conv", "Relu", "AveragePool", "Flatten", "Gemm"]
    onnx.checker.check_model(out)
    x = np.random.default_rng(1).standard_normal((2, 3, 14, 14)).astype(F32)
    got = assert_equivalent(original, out, {"x": x}, atol=1e-5)
    with torch.no_grad():
        np.testing.assert_allclose(got["y"], net(torch.from_numpy(x)).numpy(), atol=1e-4)
