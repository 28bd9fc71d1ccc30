"""remove-zero-channels on all-zero *producer* units (MatMul columns, conv filters): removed
when the channel reaches its consumers as exact zeros, kept when an op turns 0 into a
constant.

    x [2,5,8] ─ MatMul w1 [8,6] ─ Add b1 ─ ACT ─ MatMul w2 [6,4] ─ y
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper, numpy_helper

from graphopt.core.contract import Context
from graphopt.core.manager import PassManager
from graphopt.passes.width import RemoveZeroChannels
from graphopt.testing import assert_equivalent, make_model

N = helper.make_node
RNG = np.random.default_rng(3)


def mlp(act: str, zero_cols=(1, 4), bias_value=0.0):
    w1 = RNG.standard_normal((8, 6)).astype(np.float32)
    b1 = RNG.standard_normal(6).astype(np.float32)
    w1[:, list(zero_cols)] = 0.0
    b1[list(zero_cols)] = bias_value
    nodes = [N("MatMul", ["x", "w1"], ["h"], name="fc1"), N("Add", ["h", "b1"], ["hb"]),
             N(act, ["hb"], ["a"]), N("MatMul", ["a", "w2"], ["y"], name="fc2")]
    return make_model(nodes, {"x": [2, 5, 8]}, ["y"],
                      {"w1": w1, "b1": b1, "w2": RNG.standard_normal((6, 4)).astype(np.float32)})


def _run(model):
    out, report = PassManager([RemoveZeroChannels()]).run(model, Context())
    return out, report.passes[0]


def _shape(model, name):
    return next(numpy_helper.to_array(i).shape for i in model.graph.initializer
                if i.name == name)


@pytest.mark.parametrize("act", ["Relu", "Tanh"])
def test_zero_producer_columns_are_removed_losslessly(act):
    """Columns 1 and 4 of w1 and of its bias are zero: after Relu/Tanh the channels are 0,
    so fc1 loses 2 output columns and fc2 the matching input rows; outputs are unchanged."""
    model = mlp(act)
    out, entry = _run(model)
    assert entry.status == "changed", entry.error
    assert entry.counters["units_zero_producer"] == 2
    assert _shape(out, "w1") == (8, 4) and _shape(out, "w2") == (4, 4)
    assert entry.max_abs_diff is not None and entry.max_abs_diff < 1e-5
    assert_equivalent(model, out)


def test_zero_producer_into_sigmoid_is_kept():
    """Sigmoid(0) = 0.5: the channel is a non-zero constant at the consumer, so nothing
    is removed (removing it would change the outputs)."""
    out, entry = _run(mlp("Sigmoid"))
    assert entry.status == "unchanged"
    assert _shape(out, "w1") == (8, 6)


def test_zero_columns_with_non_zero_bias_are_kept():
    """A zero weight column with a non-zero bias is a constant channel, not a zero one."""
    out, entry = _run(mlp("Relu", bias_value=0.7))
    assert entry.status == "unchanged"


def test_zero_conv_filters_before_batchnorm_are_kept_but_after_relu_removed():
    """Conv filters 0 and 3 are zero. Through BatchNorm (beta != 0) the channel is a
    constant, so it stays; with no BatchNorm it is zero after Relu and goes."""
    w1 = RNG.standard_normal((6, 3, 3, 3)).astype(np.float32)
    w1[[0, 3]] = 0.0
    w2 = RNG.standard_normal((4, 6, 1, 1)).astype(np.float32)
    plain = make_model([N("Conv", ["x", "w1"], ["a"], name="c1", kernel_shape=[3, 3],
                          pads=[1] * 4),
                        N("Relu", ["a"], ["r"]),
                        N("Conv", ["r", "w2"], ["y"], name="c2", kernel_shape=[1, 1])],
                       {"x": [1, 3, 6, 6]}, ["y"], {"w1": w1, "w2": w2})
    out, entry = _run(plain)
    assert entry.counters["units_zero_producer"] == 2 and _shape(out, "w1")[0] == 4
    assert_equivalent(plain, out)
    bn = {"g": np.ones(6, np.float32), "be": np.full(6, 0.3, np.float32),
          "mu": np.zeros(6, np.float32), "var": np.ones(6, np.float32)}
    with_bn = make_model([N("Conv", ["x", "w1"], ["a"], name="c1", kernel_shape=[3, 3],
                            pads=[1] * 4),
                          N("BatchNormalization", ["a", "g", "be", "mu", "var"], ["n"]),
                          N("Relu", ["n"], ["r"]),
                          N("Conv", ["r", "w2"], ["y"], name="c2", kernel_shape=[1, 1])],
                         {"x": [1, 3, 6, 6]}, ["y"], {"w1": w1, "w2": w2, **bn})
    assert _run(with_bn)[1].status == "unchanged"
