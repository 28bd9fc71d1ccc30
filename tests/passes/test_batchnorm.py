"""Tests for passes/batchnorm.py: each builds the smallest graph showing one case."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from graphopt.core.contract import Context
from graphopt.core.manager import PassManager
from graphopt.passes.batchnorm import FoldBatchNorm
from graphopt.testing import (assert_equivalent, make_model, op_types, run_pass,
                              skip_reasons)

F32 = np.float32
RNG = np.random.default_rng(0)
BN_NAMES = ("scale", "bias", "mean", "var")


def _rand(*shape) -> np.ndarray:
    return RNG.standard_normal(shape).astype(F32)


def _bn_params(c: int) -> dict[str, np.ndarray]:
    return {"scale": RNG.uniform(0.5, 1.5, c).astype(F32), "bias": _rand(c),
            "mean": _rand(c), "var": RNG.uniform(0.5, 2.0, c).astype(F32)}


def _bn(x: str, y: str = "y", **attrs) -> onnx.NodeProto:
    return helper.make_node("BatchNormalization", [x, *BN_NAMES], [y], name="bn", **attrs)


def _assert_folded(model, result, ops, atol=1e-5):
    assert result.modified and result.counters["batchnorms_folded"] == 1
    assert op_types(result.model) == ops
    assert [o.name for o in result.model.graph.output] == [o.name for o in model.graph.output]
    assert_equivalent(model, result.model, atol=atol, rtol=1e-5)


# --------------------------------------------------------------------------- folds


def test_conv_with_bias():
    """x -> Conv(W, b) -> BN -> y: W scaled per output channel, b shifted; Conv writes y."""
    model = make_model([helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
                        _bn("c")], {"x": [1, 3, 8, 8]}, ["y"],
                       {"w": _rand(4, 3, 3, 3), "b": _rand(4), **_bn_params(4)})
    result = run_pass(FoldBatchNorm(), model)
    _assert_folded(model, result, ["Conv"])
    assert list(result.model.graph.node[0].output) == ["y"]
    # The weights were read by the Conv alone: rewritten in place, BN parameters pruned.
    assert {t.name for t in result.model.graph.initializer} == {"w", "b"}


def test_grouped_conv_without_bias_weight_in_constant_node():
    """Conv(group=2) whose weight is a Constant node and which has no bias: the Constant is
    rewritten and a bias is created."""
    nodes = [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(
                 _rand(4, 2, 3, 3))),
             helper.make_node("Conv", ["x", "w"], ["c"], group=2),
             _bn("c")]
    model = make_model(nodes, {"x": [2, 4, 6, 6]}, ["y"], _bn_params(4))
    result = run_pass(FoldBatchNorm(), model)
    _assert_folded(model, result, ["Constant", "Conv"])
    assert len(result.model.graph.node[1].input) == 3


def test_conv_transpose_grouped():
    """ConvTranspose(group=2, stride 2), weight [C_in, C_out/group, k, k]: the scale is laid
    out per group along axis 1."""
    model = make_model([helper.make_node("ConvTranspose", ["x", "w", "b"], ["c"], group=2,
                                         strides=[2, 2]),
                        _bn("c")], {"x": [1, 4, 5, 5]}, ["y"],
                       {"w": _rand(4, 3, 3, 3), "b": _rand(6), **_bn_params(6)})
    result = run_pass(FoldBatchNorm(), model)
    _assert_folded(model, result, ["ConvTranspose"])


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_with_c_and_beta(trans_b):
    """Gemm(alpha=0.5, beta=2, transB) with C [N]: columns of B scaled, C becomes
    beta*C*s + t and beta 1."""
    w = _rand(6, 5) if trans_b else _rand(5, 6)
    model = make_model([helper.make_node("Gemm", ["x", "w", "c0"], ["g"], alpha=0.5, beta=2.0,
                                         transB=trans_b),
                        _bn("g")], {"x": [3, 5]}, ["y"], {"w": w, "c0": _rand(6),
                                                          **_bn_params(6)})
    result = run_pass(FoldBatchNorm(), model)
    _assert_folded(model, result, ["Gemm"])
    gemm = result.model.graph.node[0]
    assert helper.get_node_attr_value(gemm, "beta") == 1.0


def test_gemm_without_c():
    """Gemm(beta=3) with no C: C is created from the BN shift alone, and beta set to 1."""
    model = make_model([helper.make_node("Gemm", ["x", "w"], ["g"], beta=3.0), _bn("g")],
                       {"x": [2, 4]}, ["y"], {"w": _rand(4, 3), **_bn_params(3)})
    result = run_pass(FoldBatchNorm(), model)
    _assert_folded(model, result, ["Gemm"])
    assert len(result.model.graph.node[0].input) == 3


def test_matmul_gets_a_bias_add():
    """x[2,4] -> MatMul(W[4,3]) -> BN: W's columns scaled, a new Add carries the shift."""
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["m"]), _bn("m")],
                       {"x": [2, 4]}, ["y"], {"w": _rand(4, 3), **_bn_params(3)})
    result = run_pass(FoldBatchNorm(), model)
    _assert_folded(model, result, ["MatMul", "Add"])
    assert result.counters["bias_adds_created"] == 1
    assert list(result.model.graph.node[1].output) == ["y"]


def test_matmul_add_bias_folded_into_add():
    """MatMul -> Add(const bias, as first input) -> BN: the existing Add's bias absorbs it."""
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["m"]),
                        helper.make_node("Add", ["b", "m"], ["a"]), _bn("a")],
                       {"x": [2, 4]}, ["y"], {"w": _rand(4, 3), "b": _rand(3),
                                              **_bn_params(3)})
    result = run_pass(FoldBatchNorm(), model)
    _assert_folded(model, result, ["MatMul", "Add"])
    assert result.counters["bias_adds_created"] == 0


def test_shared_weight_is_copied():
    """Two Convs share W and only one feeds a BN: that one gets a scaled copy of W, the
    other still reads the original."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c1"]),
             helper.make_node("Conv", ["x", "w"], ["z"]),
             _bn("c1")]
    model = make_model(nodes, {"x": [1, 2, 4, 4]}, ["y", "z"], {"w": _rand(3, 2, 1, 1),
                                                                  **_bn_params(3)})
    result = run_pass(FoldBatchNorm(), model)
    assert result.counters["batchnorms_folded"] == 1
    first, second = result.model.graph.node
    assert first.input[1] != "w" and second.input[1] == "w"
    assert_equivalent(model, result.model, atol=1e-5)


def test_dynamic_batch_under_manager():
    """Conv+BN with a dynamic batch dim runs under the manager's numeric check."""
    model = make_model([helper.make_node("Conv", ["x", "w", "b"], ["c"]), _bn("c")],
                       {"x": ["n", 3, 5, 5]}, ["y"],
                       {"w": _rand(4, 3, 3, 3), "b": _rand(4), **_bn_params(4)})
    ctx = Context(input_shapes={"x": (2, 3, 5, 5)})
    out, report = PassManager([FoldBatchNorm()]).run(model, ctx)
    assert report.ok and report.passes[0].status == "changed"
    assert "BatchNormalization" not in op_types(out)


# --------------------------------------------------------------------------- skips


def _conv_bn(**changes):
    """x -> Conv -> c -> BN -> y, with one piece swapped per skip case."""
    nodes = changes.get("nodes") or [helper.make_node("Conv", ["x", "w", "b"], ["c"]),
                                     _bn("c")]
    inputs = {"x": [1, 2, 4, 4], **changes.get("inputs", {})}
    inits = {"w": _rand(3, 2, 1, 1), "b": _rand(3), **_bn_params(3)}
    for name in changes.get("drop", ()):
        del inits[name]
    return make_model(nodes, inputs, changes.get("outputs", ["y"]), inits,
                      opset=changes.get("opset", 17))


SKIPS = {
    "two readers": (
        dict(nodes=[helper.make_node("Conv", ["x", "w", "b"], ["c"]), _bn("c"),
                    helper.make_node("Relu", ["c"], ["z"])], outputs=["y", "z"]),
        "'c' has 2 readers; folding would change the others"),
    "graph output": (
        dict(outputs=["y", "c"]), "'c' is also a graph output"),
    "graph input": (
        dict(nodes=[_bn("x")], inputs={"x": [1, 3, 4, 4]}), "input 'x' is not produced by a node"),
    "after relu": (
        dict(nodes=[helper.make_node("Relu", ["x"], ["r"]), _bn("r")], inputs={"x": [1, 3, 2, 2]}),
        "input is produced by Relu, not by Conv, ConvTranspose, Gemm or MatMul"),
    "mean not constant": (
        dict(inputs={"mean": [3]}, drop=["mean"]), "its mean input 'mean' is not a constant"),
    "weight not constant": (
        dict(inputs={"w": [3, 2, 1, 1]}, drop=["w"]), "Conv weight 'w' is not a constant"),
    "bias not constant": (
        dict(inputs={"b": [3]}, drop=["b"]), "Conv bias 'b' is not a constant"),
    "training mode": (
        dict(nodes=[helper.make_node("Conv", ["x", "w", "b"], ["c"]),
                    _bn("c", training_mode=1)]), "training_mode=1"),
}


@pytest.mark.parametrize("case", list(SKIPS))
def test_skipskip_reasons(case):
    """Each BN the pass must leave alone, with its reason; the model is unchanged."""
    changes, reason = SKIPS[case]
    model = _conv_bn(**changes)
    result = run_pass(FoldBatchNorm(), model)
    assert not result.modified
    assert "BatchNormalization" in op_types(result.model)
    assert skip_reasons(result) == [reason]


def test_skip_gemm_c_not_constant():
    """Gemm whose C is a graph input: skipped."""
    model = make_model([helper.make_node("Gemm", ["x", "w", "c0"], ["g"]), _bn("g")],
                       {"x": [2, 4], "c0": [3]}, ["y"], {"w": _rand(4, 3), **_bn_params(3)})
    assert skip_reasons(run_pass(FoldBatchNorm(), model)) == ["Gemm C input 'c0' is not a constant"]


def test_skip_matmul_rank_3():
    """x[2,5,4] -> MatMul -> BN: BN's channel axis 1 is the sequence axis, not W's columns."""
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["m"]), _bn("m")],
                       {"x": [2, 5, 4]}, ["y"], {"w": _rand(4, 3), **_bn_params(5)})
    assert skip_reasons(run_pass(FoldBatchNorm(), model)) == [
        "MatMul output has rank 3; BatchNormalization's channel axis 1 is the weight's column "
        "axis only for rank 2"]


def test_skip_matmul_batched_weight():
    """MatMul with a 3-D constant weight: skipped."""
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["m"]), _bn("m")],
                       {"x": [2, 2, 4]}, ["y"], {"w": _rand(2, 4, 3), **_bn_params(2)})
    assert skip_reasons(run_pass(FoldBatchNorm(), model)) == ["MatMul weight (second input) has rank 3, not 2"]


def test_skip_matmul_output_read_twice():
    """MatMul -> Add(bias) -> BN where the MatMul output is also a graph output."""
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["m"]),
                        helper.make_node("Add", ["m", "b"], ["a"]), _bn("a")],
                       {"x": [2, 4]}, ["y", "m"], {"w": _rand(4, 3), "b": _rand(3),
                                                   **_bn_params(3)})
    assert skip_reasons(run_pass(FoldBatchNorm(), model)) == ["'m' is also a graph output"]


def test_skip_channel_mismatch():
    """A BN with more channels than the Conv has outputs (an invalid model): refused."""
    model = make_model([helper.make_node("Conv", ["x", "w"], ["c"]), _bn("c")],
                       {"x": [1, 2, 4, 4]}, {"y": [1, 3, 4, 4]},
                       {"w": _rand(3, 2, 1, 1), **_bn_params(5)})
    assert skip_reasons(run_pass(FoldBatchNorm(), model)) == ["Conv has 3 output channels but BatchNormalization has 5"]


def test_skip_param_lengths_differ():
    """BN parameters of different lengths (an invalid model): refused."""
    params = {**_bn_params(3), "var": np.ones(2, F32)}
    model = make_model([helper.make_node("Conv", ["x", "w"], ["c"]), _bn("c")],
                       {"x": [1, 2, 4, 4]}, {"y": [1, 3, 4, 4]},
                       {"w": _rand(3, 2, 1, 1), **params})
    assert skip_reasons(run_pass(FoldBatchNorm(), model)) == ["its scale, B, mean and var have different lengths"]


def test_skip_spatial_zero():
    """Opset-7 BN with spatial=0 (per-element statistics): skipped."""
    model = make_model([helper.make_node("Conv", ["x", "w"], ["c"]), _bn("c", spatial=0)],
                       {"x": [1, 2, 4, 4]}, {"y": [1, 3, 4, 4]},
                       {"w": _rand(3, 2, 1, 1), **_bn_params(3)}, opset=7)
    assert skip_reasons(run_pass(FoldBatchNorm(), model)) == ["spatial=0 (per-element statistics) is not supported"]


def test_skip_training_outputs_used():
    """Opset-9 BN whose running-mean output is read: skipped."""
    bn = helper.make_node("BatchNormalization", ["c", *BN_NAMES], ["y", "rm", "rv", "", ""],
                          name="bn")
    model = make_model([helper.make_node("Conv", ["x", "w"], ["c"]), bn],
                       {"x": [1, 2, 4, 4]}, {"y": [1, 3, 4, 4], "rm": [3]},
                       {"w": _rand(3, 2, 1, 1), **_bn_params(3)}, opset=9)
    assert skip_reasons(run_pass(FoldBatchNorm(), model)) == ["training outputs are used ('rm')"]


def _with_initializers_as_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    for t in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, t.dims))
    return model


def test_skip_overridable_initializer():
    """IR 10 with initializers also listed as graph inputs: callers may feed other values."""
    model = _with_initializers_as_inputs(_conv_bn())
    assert skip_reasons(run_pass(FoldBatchNorm(), model)) == [
        "its scale input 'scale' is an initializer listed as a graph input, which callers may "
        "override"]


def test_ir3_initializers_listed_as_inputs_still_fold():
    """IR 3 lists every initializer as a graph input by rule: they are still constants, and
    the new bias of a bias-less Conv is listed too (BN parameters leave the list)."""
    model = _with_initializers_as_inputs(_conv_bn(
        opset=8, drop=["b"], nodes=[helper.make_node("Conv", ["x", "w"], ["c"]), _bn("c")]))
    model.ir_version = 3
    onnx.checker.check_model(model)
    result = run_pass(FoldBatchNorm(), model)
    assert result.counters["batchnorms_folded"] == 1
    assert op_types(result.model) == ["Conv"]
    graph = result.model.graph
    assert {i.name for i in graph.input} == {"x"} | {t.name for t in graph.initializer}
    assert len(graph.initializer) == 2
    assert_equivalent(model, result.model, atol=1e-5)
