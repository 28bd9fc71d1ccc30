"""Tests for passes/pad.py: each builds the smallest graph showing one case."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphopt.core.contract import Context
from graphopt.core.manager import PassManager
from graphopt.passes.pad import FoldPad
from graphopt.testing import (assert_equivalent, make_model, op_types, run_pass,
                              skip_reasons)

F32 = np.float32
RNG = np.random.default_rng(0)
X = {"x": [1, 2, 5, 5]}


def _pads(*values) -> np.ndarray:
    return np.array(values, np.int64)


def _pad(data="x", out="p", pads="pads", value=None, axes=None, **attrs) -> onnx.NodeProto:
    inputs = [data, pads] + ([value or ""] if value or axes else []) + ([axes] if axes else [])
    return helper.make_node("Pad", inputs, [out], name="pad", **attrs)


def _conv(data="p", **attrs) -> onnx.NodeProto:
    return helper.make_node("Conv", [data, "w"], ["y"], name="conv", **attrs)


W = {"w": RNG.standard_normal((3, 2, 3, 3)).astype(F32)}


def _assert_folded(model, result, ops, count=1):
    assert result.counters["pads_folded"] == count
    assert op_types(result.model) == ops
    assert_equivalent(model, result.model, atol=1e-5)


# --------------------------------------------------------------------------- folds


def test_pad_input_form_into_conv_with_pads():
    """Pad (opset 11+, pads input, begin 1/2, end 0/1) -> Conv(pads 1): pads add up."""
    model = make_model([_pad(), _conv(pads=[1, 1, 1, 1])], X, ["y"],
                       {"pads": _pads(0, 0, 1, 2, 0, 0, 0, 1), **W})
    result = run_pass(FoldPad(), model)
    _assert_folded(model, result, ["Conv"])
    conv = result.model.graph.node[0]
    assert conv.input[0] == "x"
    assert helper.get_node_attr_value(conv, "pads") == [2, 3, 1, 2]
    assert not result.model.graph.initializer[1:]  # the pads constant is pruned


def test_pad_attribute_form_opset_10():
    """Opset-10 Pad (pads and value as attributes) -> Conv."""
    model = make_model([helper.make_node("Pad", ["x"], ["p"], pads=[0, 0, 1, 1, 0, 0, 1, 1],
                                         value=0.0), _conv()], X, ["y"], W, opset=10)
    result = run_pass(FoldPad(), model)
    _assert_folded(model, result, ["Conv"])


def test_pad_with_negative_axes_opset_18():
    """Opset-18 Pad with axes [-2, -1], an explicit zero constant_value from a Constant node."""
    nodes = [helper.make_node("Constant", [], ["zero"], value=helper.make_tensor(
                 "zero", TensorProto.FLOAT, [], [0.0])),
             _pad(value="zero", axes="axes"), _conv()]
    model = make_model(nodes, X, ["y"], {"pads": _pads(1, 2, 2, 1),
                                          "axes": _pads(-2, -1), **W}, opset=18)
    result = run_pass(FoldPad(), model)
    _assert_folded(model, result, ["Conv"])
    assert helper.get_node_attr_value(result.model.graph.node[0], "pads") == [1, 2, 2, 1]


def test_average_pool_count_include_pad():
    """Pad -> AveragePool(count_include_pad=1): the zeros were averaged in, and still are."""
    model = make_model([_pad(), helper.make_node("AveragePool", ["p"], ["y"], kernel_shape=[3, 3],
                                                 count_include_pad=1)], X, ["y"],
                       {"pads": _pads(0, 0, 1, 1, 0, 0, 1, 1)})
    result = run_pass(FoldPad(), model)
    _assert_folded(model, result, ["AveragePool"])


def test_max_pool_neg_inf_pad():
    """Pad(value=-inf) -> MaxPool: MaxPool's own padding never wins the max either."""
    model = make_model([_pad(value="v"), helper.make_node("MaxPool", ["p"], ["y"],
                                                          kernel_shape=[2, 2], strides=[2, 2])],
                       X, ["y"], {"pads": _pads(0, 0, 1, 1, 0, 0, 0, 0),
                                  "v": np.array(-np.inf, F32)})
    result = run_pass(FoldPad(), model)
    _assert_folded(model, result, ["MaxPool"])


def test_max_pool_zero_pad_after_relu():
    """Relu -> Pad(0) -> MaxPool: the input is >= 0, so a padded 0 never changes the max."""
    model = make_model([helper.make_node("Relu", ["x"], ["r"]), _pad("r"),
                        helper.make_node("MaxPool", ["p"], ["y"], kernel_shape=[3, 3])],
                       X, ["y"], {"pads": _pads(0, 0, 1, 1, 0, 0, 1, 1)})
    result = run_pass(FoldPad(), model)
    _assert_folded(model, result, ["Relu", "MaxPool"])


def test_max_pool_zero_pad_after_clip_min_zero():
    """Clip(min=0) -> Pad(0) -> MaxPool: Clip with a non-negative min counts as >= 0."""
    model = make_model([helper.make_node("Clip", ["x", "lo"], ["r"]), _pad("r"),
                        helper.make_node("MaxPool", ["p"], ["y"], kernel_shape=[3, 3])],
                       X, ["y"], {"lo": np.array(0, F32), "pads": _pads(0, 0, 1, 1, 0, 0, 1, 1)})
    _assert_folded(model, run_pass(FoldPad(), model), ["Clip", "MaxPool"])


def test_pad_chain_folds_in_rounds():
    """Pad -> Pad -> Conv: the second folds first, then the first."""
    nodes = [_pad("x", "p0", "pa"), _pad("p0", "p", "pb"), _conv()]
    nodes[0].name = "pad0"
    model = make_model(nodes, X, ["y"], {"pa": _pads(0, 0, 1, 0, 0, 0, 0, 0),
                                          "pb": _pads(0, 0, 0, 1, 0, 0, 1, 1), **W})
    result = run_pass(FoldPad(), model)
    _assert_folded(model, result, ["Conv"], count=2)
    assert helper.get_node_attr_value(result.model.graph.node[0], "pads") == [1, 1, 1, 1]


def test_torch_style_pad_under_manager():
    """Pad with a dynamic batch dim, through the manager's verification."""
    model = make_model([_pad(), _conv()], {"x": ["n", 2, 5, 5]}, ["y"],
                       {"pads": _pads(0, 0, 1, 1, 0, 0, 1, 1), **W})
    out, report = PassManager([FoldPad()]).run(model, Context())
    assert report.ok and op_types(out) == ["Conv"]


# --------------------------------------------------------------------------- no-op pads


def test_noop_pad_removed():
    """A Pad of all zeros (reflect mode even) is removed; Relu reads x."""
    model = make_model([_pad(mode="reflect"), helper.make_node("Relu", ["p"], ["y"])], X, ["y"],
                       {"pads": _pads(0, 0, 0, 0, 0, 0, 0, 0)})
    result = run_pass(FoldPad(), model)
    assert result.counters["noop_pads_removed"] == 1
    assert op_types(result.model) == ["Relu"]
    assert not result.model.graph.initializer
    assert_equivalent(model, result.model, atol=0, rtol=0)


def test_noop_pad_to_graph_output_renames_producer():
    """Relu -> r -> no-op Pad -> y (graph output): Relu writes 'y' directly."""
    model = make_model([helper.make_node("Relu", ["x"], ["r"]), _pad("r", "y")], X, ["y"],
                       {"pads": _pads(0, 0, 0, 0, 0, 0, 0, 0)})
    result = run_pass(FoldPad(), model)
    assert op_types(result.model) == ["Relu"]
    assert list(result.model.graph.node[0].output) == ["y"]
    assert_equivalent(model, result.model, atol=0, rtol=0)


def test_noop_pad_graph_input_to_output_kept():
    """x (graph input) -> no-op Pad -> y (graph output): kept, with the reason."""
    model = make_model([_pad("x", "y")], X, ["y"], {"pads": _pads(0, 0, 0, 0, 0, 0, 0, 0)})
    result = run_pass(FoldPad(), model)
    assert not result.modified
    assert skip_reasons(result) == [
        "no-op Pad kept: graph input 'x' passes straight to graph output 'y'; kept so both "
        "names stay"]


# --------------------------------------------------------------------------- skips


def _pool(op, **attrs):
    return helper.make_node(op, ["p"], ["y"], name="pool", kernel_shape=[3, 3], **attrs)


P1 = _pads(0, 0, 1, 1, 0, 0, 1, 1)

SKIPS = {
    "pads not constant": (
        [_pad(pads="dyn_pads"), _conv()], {"dyn_pads": ([8], TensorProto.INT64)}, {},
        "pads input 'dyn_pads' is not a constant"),
    "value not constant": (
        [_pad(value="v"), _conv()], {"v": ([], TensorProto.FLOAT)}, {"pads": P1},
        "constant_value input 'v' is not a constant"),
    "axes not constant": (
        [_pad(axes="ax"), _conv()], {"ax": ([4], TensorProto.INT64)},
        {"pads": P1, "out": {"y": [1, 3, 5, 5]}}, "axes input 'ax' is not a constant"),
    "negative pads": (
        [_pad(), _conv()], {}, {"pads": _pads(0, 0, -1, 0, 0, 0, 1, 1)},
        "negative pads crop the input; they cannot fold into a Conv or pool"),
    "reflect": (
        [_pad(mode="reflect"), _conv()], {}, {"pads": P1},
        "mode 'reflect' is not constant padding"),
    "nonzero value for conv": (
        [_pad(value="v"), _conv()], {}, {"pads": P1, "v": np.array(1.5, F32)},
        "pad value 1.5 is not 0, Conv pads with zeros"),
    "channel axis": (
        [_pad(), _conv()], {}, {"pads": _pads(0, 1, 1, 1, 0, 0, 1, 1)},
        "it pads the batch or channel axis"),
    "two readers": (
        [_pad(), _conv(), helper.make_node("Relu", ["p"], ["z"])], {},
        {"pads": P1, "out": ["y", "z"]}, "its output has 2 readers; folding needs exactly one"),
    "graph output": (
        [_pad(), _conv()], {}, {"pads": P1, "out": ["y", "p"]},
        "its output 'p' is a graph output"),
    "feeds relu": (
        [_pad(), helper.make_node("Relu", ["p"], ["y"])], {}, {"pads": P1},
        "it feeds Relu, which cannot absorb padding"),
    "pads the weight": (
        [_pad("x0", "p"), helper.make_node("Conv", ["x", "p"], ["y"])], {"x0": ([3, 2, 1, 1],
                                                                              TensorProto.FLOAT)},
        {"pads": P1}, "it feeds Conv through an input other than the data input"),
    "auto_pad": (
        [_pad(), _conv(auto_pad="SAME_UPPER")], {}, {"pads": P1},
        "Conv has auto_pad=SAME_UPPER, not NOTSET"),
    "rank unknown": (
        [_pad(), helper.make_node("Conv", ["p", "wi"], ["y"])], {"wi": ([3, 2, 3, 3],
                                                                       TensorProto.FLOAT)},
        {"pads": P1}, "the rank of Conv's input is unknown"),
    "pads do not fit rank": (
        [_pad(), _conv()], {}, {"pads": _pads(1, 1, 1, 1, 1, 1)},
        "its pads do not fit the input's rank 4"),
    "odd pads": (
        [_pad(), _conv()], {}, {"pads": _pads(1, 1, 1)}, "its 3 pads do not match the padded axes"),
    "avgpool excludes pad": (
        [_pad(), _pool("AveragePool")], {}, {"pads": P1},
        "AveragePool has count_include_pad=0; padded zeros would leave the divisor"),
    "avgpool nonzero value": (
        [_pad(value="v"), _pool("AveragePool", count_include_pad=1)], {},
        {"pads": P1, "v": np.array(2, F32)}, "pad value 2 is not 0"),
    "ceil mode": (
        [_pad(), _pool("AveragePool", count_include_pad=1, ceil_mode=1, strides=[3, 3])], {},
        {"pads": P1},
        "spatial axis 2 (static): at input length 5 the op makes 3 windows before the fold and "
        "2 after (ceil_mode counts the padding differently)"),
    "maxpool zero pad": (
        [_pad(), _pool("MaxPool")], {}, {"pads": P1},
        "pad value 0 can win MaxPool's max (it is not -inf and the input is not known "
        "non-negative)"),
    "maxpool indices": (
        [_pad(value="v"), helper.make_node("MaxPool", ["p"], ["y", "idx"], kernel_shape=[3, 3])],
        {}, {"pads": P1, "v": np.array(-np.inf, F32), "out": ["y", "idx"]},
        "MaxPool's Indices output is used; the indices would no longer count the padding"),
    "pads reach kernel": (
        [_pad(value="v"), helper.make_node("MaxPool", ["p"], ["y"], kernel_shape=[2, 2])], {},
        {"pads": _pads(0, 0, 2, 0, 0, 0, 0, 0), "v": np.array(-np.inf, F32)},
        "combined pads [2, 0, 0, 0] would reach the kernel size [2, 2], which MaxPool does not "
        "allow"),
}


@pytest.mark.parametrize("case", list(SKIPS))
def test_skipskip_reasons(case):
    """Each Pad the pass must leave alone, with its reason; nothing changes."""
    nodes, extra_inputs, inits, reason = SKIPS[case]
    inits = dict(inits)
    outputs = inits.pop("out", ["y"])
    inputs = [("x", [1, 2, 5, 5], TensorProto.FLOAT)]
    inputs += [(name, dims, dtype) for name, (dims, dtype) in extra_inputs.items()]
    if any(n.op_type == "Conv" and n.input[1] == "w" for n in nodes):
        inits.update(W)
    opset = 18 if any(len(n.input) > 3 for n in nodes) else 17
    model = make_model(nodes, inputs, outputs, inits, opset=opset)
    result = run_pass(FoldPad(), model)
    assert not result.modified
    assert "Pad" in op_types(result.model)
    assert skip_reasons(result) == [reason]
