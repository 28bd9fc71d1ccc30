"""Coupling analysis on hand-built graphs: one case per op handler (pruned and checked by
masked equivalence) and one per barrier (with its reason).

Most graphs are a *sandwich*::

    x ─ Conv c1 (8 filters) ─ a ─ [op under test] ─ b ─ Conv c2 ─ y

so the group of c1's filters must flow through the op to c2's input channels.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from graphopt.analysis.coupling import Group, analyze, coupled_groups
from graphopt.testing import make_model, masked_equivalence

RNG = np.random.default_rng(0)
C = 8


def _w(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def sandwich(middle, inits=None, *, c2_in=C, x_shape=(2, 3, 6, 6), b="b", opset=17,
             extra_outputs=(), domains=None, extra_inputs=None):
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="c1", pads=[1, 1, 1, 1],
                              kernel_shape=[3, 3])]
    nodes += middle
    nodes.append(helper.make_node("Conv", [b, "w2"], ["y"], name="c2", kernel_shape=[1, 1]))
    weights = {"w1": _w(C, x_shape[1], 3, 3), "b1": _w(C), "w2": _w(4, c2_in, 1, 1)}
    weights.update(inits or {})
    inputs = [("x", list(x_shape), TensorProto.FLOAT), *(extra_inputs or [])]
    return make_model(nodes, inputs, ["y", *extra_outputs], weights, opset=opset,
                      extra_opsets=domains)


def c1_group(model) -> Group:
    return next(g for g in coupled_groups(model) if g.source == "c1")


def check(model, group: Group | None = None, units=(1, 4, 6)):
    group = group or c1_group(model)
    assert group.prunable, group.reason
    return masked_equivalence(model, {group.id: np.array(units)})[0]


N = helper.make_node


@pytest.mark.parametrize("op,attrs", [
    ("Relu", {}), ("LeakyRelu", {"alpha": 0.1}), ("Sigmoid", {}), ("HardSigmoid", {}),
    ("HardSwish", {}), ("Tanh", {}), ("Erf", {}), ("Softplus", {}), ("Mish", {}),
    ("Identity", {}), ("Elu", {}), ("Abs", {}),
])
def test_unary_activations(op, attrs):
    """Unary activations carry every axis one to one."""
    model = sandwich([N(op, ["a"], ["b"], **attrs)], opset=18)
    check(model)


def test_gelu_op_and_dropout_and_clip():
    """Gelu (opset 20), Dropout (inference) and Clip with scalar bounds."""
    model = sandwich([N("Gelu", ["a"], ["g"]), N("Dropout", ["g"], ["d"]),
                      N("Clip", ["d", "lo", "hi"], ["b"])],
                     {"lo": np.array(0.0, np.float32), "hi": np.array(6.0, np.float32)},
                     opset=20)
    check(model)


def test_prelu_per_channel_slope_is_sliced():
    """PRelu's per-channel slope [C,1,1] is a member and loses the pruned channels."""
    model = sandwich([N("PRelu", ["a", "slope"], ["b"])], {"slope": _w(C, 1, 1)})
    group = c1_group(model)
    assert any("slope" in m and "param" in m for m in group.members)
    pruned = check(model)
    slope = next(i for i in pruned.graph.initializer if i.name.startswith("slope"))
    assert tuple(slope.dims) == (C - 3, 1, 1)


def test_decomposed_swish_and_erf_gelu():
    """x·sigmoid(x) and 0.5·x·(1+erf(x/√2)): the same tensor on both sides of a Mul."""
    k = {"half": np.array(0.5, np.float32), "one": np.array(1.0, np.float32),
         "r2": np.array(1.4142135, np.float32)}
    model = sandwich([N("Sigmoid", ["a"], ["s"]), N("Mul", ["a", "s"], ["sw"]),
                      N("Div", ["sw", "r2"], ["t"]), N("Erf", ["t"], ["e"]),
                      N("Add", ["e", "one"], ["e1"]), N("Mul", ["sw", "e1"], ["m"]),
                      N("Mul", ["m", "half"], ["b"])], k)
    check(model)


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div", "Max", "Min", "Pow"])
def test_broadcast_per_channel_constants(op):
    """Elementwise ops slice per-channel constants [C,1,1] and leave scalars alone."""
    const = np.abs(_w(C, 1, 1)) + 0.5
    model = sandwich([N("Relu", ["a"], ["r"]), N(op, ["r", "k"], ["o"]),
                      N("Add", ["o", "s"], ["b"])],
                     {"k": const, "s": np.array(0.25, np.float32)})
    check(model)


def test_where_with_per_channel_condition():
    """Where(cond[C,1,1], a, 0) slices its per-channel condition."""
    cond = (RNG.random((C, 1, 1)) > 0.3)
    model = sandwich([N("Where", ["cond", "a", "zero"], ["b"])],
                     {"cond": cond, "zero": np.array(0.0, np.float32)})
    check(model)


def test_batchnorm_and_instancenorm_parameters_are_sliced():
    """BatchNormalization and InstanceNormalization parameters follow the channels."""
    bn = {"g": _w(C), "be": _w(C), "mu": _w(C), "var": np.abs(_w(C)) + 0.5,
          "ig": _w(C), "ib": _w(C)}
    model = sandwich([N("BatchNormalization", ["a", "g", "be", "mu", "var"], ["n"]),
                      N("InstanceNormalization", ["n", "ig", "ib"], ["b"])], bn)
    roles = {m.split(" (")[-1] for m in c1_group(model).members if "(" in m}
    assert {"bn_scale)", "param)"} <= roles
    check(model)


def test_concat_with_another_branch():
    """Concat: each input's channels map to their offset; c2 sees 8 + 5 inputs."""
    model = sandwich([N("Conv", ["x", "w3"], ["o"], name="c3", kernel_shape=[1, 1]),
                      N("Concat", ["o", "a"], ["b"], axis=1)],
                     {"w3": _w(5, 3, 1, 1)}, c2_in=C + 5)
    pruned = check(model)
    c3 = next(g for g in coupled_groups(model) if g.source == "c3")
    masked_equivalence(model, {c3.id: np.array([0, 2])})
    assert any(tuple(i.dims) == (4, C + 5 - 3, 1, 1) for i in pruned.graph.initializer)


def test_split_into_two_consumers():
    """Split along channels: sizes shrink per output; each half feeds its own conv."""
    nodes = [N("Conv", ["x", "w1"], ["a"], name="c1", kernel_shape=[1, 1]),
             N("Split", ["a", "sizes"], ["p", "q"], axis=1),
             N("Conv", ["p", "wp"], ["yp"], name="cp", kernel_shape=[1, 1]),
             N("Conv", ["q", "wq"], ["yq"], name="cq", kernel_shape=[1, 1]),
             N("Add", ["yp", "yq"], ["y"])]
    model = make_model(nodes, {"x": [1, 3, 4, 4]}, ["y"],
                       {"w1": _w(C, 3, 1, 1), "sizes": np.array([3, 5], np.int64),
                        "wp": _w(2, 3, 1, 1), "wq": _w(2, 5, 1, 1)})
    first, second = (g for g in coupled_groups(model) if g.source == "c1")
    assert (first.size, second.size) == (3, 5)  # the halves reach different consumers
    pruned = masked_equivalence(model, {first.id: np.array([0, 2]),
                                           second.id: np.array([4])})[0]
    split = next(n for n in pruned.graph.node if n.op_type == "Split")
    sizes = next(i for i in pruned.graph.initializer if i.name == split.input[1])
    from onnx import numpy_helper

    assert numpy_helper.to_array(sizes).tolist() == [1, 4]
    assert any(n.op_type == "Conv" for n in pruned.graph.node)


def test_split_with_num_outputs_becomes_explicit():
    """Split(num_outputs=2) whose halves shrink unequally gets an explicit split input."""
    nodes = [N("Conv", ["x", "w1"], ["a"], name="c1", kernel_shape=[1, 1]),
             N("Split", ["a"], ["p", "q"], axis=1, num_outputs=2),
             N("Add", ["p", "q"], ["s"]),
             N("Conv", ["s", "w2"], ["y"], name="c2", kernel_shape=[1, 1])]
    model = make_model(nodes, {"x": [1, 3, 4, 4]}, ["y"],
                       {"w1": _w(C, 3, 1, 1), "w2": _w(2, 4, 1, 1)}, opset=18)
    group = c1_group(model)
    assert group.size == 4 and group.index[next(iter(group.index))].shape[1] == 2
    check(model, units=(1,))


def test_slice_keeps_a_channel_window():
    """Slice [2:7) of the channels: the window's bounds move; channels outside it are dead."""
    model = sandwich([N("Slice", ["a", "st", "en", "ax"], ["b"])],
                     {"st": np.array([2], np.int64), "en": np.array([7], np.int64),
                      "ax": np.array([1], np.int64)}, c2_in=5)
    groups = [g for g in coupled_groups(model) if g.source == "c1"]
    live = next(g for g in groups if any("c2" in m for m in g.members))
    dead = next(g for g in groups if g is not live)
    assert dead.size == 3 and live.size == 5
    masked_equivalence(model, {live.id: np.array([0, 3]), dead.id: np.array([0, 2])})


def test_transpose_reshape_flatten_squeeze_unsqueeze():
    """Layout ops: NCHW→NHWC→NCHW, Flatten/Reshape round trip, Squeeze/Unsqueeze."""
    model = sandwich([N("Transpose", ["a"], ["t"], perm=[0, 2, 3, 1]),
                      N("Transpose", ["t"], ["u"], perm=[0, 3, 1, 2]),
                      N("Unsqueeze", ["u", "ax0"], ["v"]),
                      N("Squeeze", ["v", "ax0"], ["w"]),
                      N("Reshape", ["w", "shape"], ["r"]),
                      N("Reshape", ["r", "back"], ["b"])],
                     {"ax0": np.array([0], np.int64),
                      "shape": np.array([2, C, 36], np.int64),
                      "back": np.array([2, C, 6, 6], np.int64)})
    check(model)


@pytest.mark.parametrize("pool", [
    N("GlobalAveragePool", ["a"], ["b"]), N("GlobalMaxPool", ["a"], ["b"]),
    N("AveragePool", ["a"], ["b"], kernel_shape=[2, 2]),
    N("MaxPool", ["a"], ["b"], kernel_shape=[3, 3], strides=[2, 2]),
])
def test_pooling(pool):
    """Pooling carries batch and channels; spatial axes are never coupled."""
    check(sandwich([pool]))


@pytest.mark.parametrize("keepdims", [0, 1])
def test_reduce_over_spatial_axes(keepdims):
    """ReduceMean over H, W (squeeze-excite) keeps the channel coupling, with or without
    kept dims."""
    middle = [N("ReduceMean", ["a", "axes"], ["m"], keepdims=keepdims),
              N("Sigmoid", ["m"], ["s"])]
    if keepdims:
        middle.append(N("Mul", ["a", "s"], ["b"]))
    else:
        middle += [N("Unsqueeze", ["s", "axes"], ["s4"]), N("Mul", ["a", "s4"], ["b"])]
    model = sandwich(middle, {"axes": np.array([2, 3], np.int64)}, opset=18)
    check(model)


def test_resize_upsample_and_spatial_pad():
    """Resize ×2 on H, W and a spatial Pad leave the channel axis one to one."""
    model = sandwich([N("Resize", ["a", "", "scales"], ["r"], mode="nearest"),
                      N("Pad", ["r", "pads"], ["b"])],
                     {"scales": np.array([1, 1, 2, 2], np.float32),
                      "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)})
    check(model)


def test_resize_with_sizes_is_rewritten():
    """Resize given output sizes: the channel entry of sizes follows the pruning."""
    model = sandwich([N("Resize", ["a", "", "", "sizes"], ["b"], mode="nearest")],
                     {"sizes": np.array([2, C, 12, 12], np.int64)})
    check(model)


def test_cast_roundtrip_and_expand():
    """Cast to float16 and back, and Expand of a per-channel tensor to full size."""
    model = sandwich([N("Cast", ["a"], ["h"], to=TensorProto.FLOAT16),
                      N("Cast", ["h"], ["f"], to=TensorProto.FLOAT),
                      N("Expand", ["k", "shape"], ["e"]),
                      N("Add", ["f", "e"], ["b"])],
                     {"k": _w(1, C, 1, 1), "shape": np.array([2, C, 6, 6], np.int64)})
    check(model)


def test_gather_channel_selection():
    """Gather with constant indices on the channel axis: indices are renumbered."""
    model = sandwich([N("Gather", ["a", "idx"], ["b"], axis=1)],
                     {"idx": np.array([6, 0, 3, 3, 5], np.int64)}, c2_in=5)
    groups = [g for g in coupled_groups(model) if g.source == "c1"]
    live = [g for g in groups if any("c2" in m for m in g.members)]
    assert live and all(g.prunable for g in live)
    masked_equivalence(model, {live[0].id: np.array([0])})


def test_conv_transpose_producer_and_consumer():
    """ConvTranspose: filters on weight axis 1 when producing, axis 0 when consuming."""
    nodes = [N("ConvTranspose", ["x", "wt1", "bt1"], ["a"], name="c1", kernel_shape=[2, 2],
               strides=[2, 2]),
             N("Relu", ["a"], ["r"]),
             N("ConvTranspose", ["r", "wt2"], ["y"], name="c2", kernel_shape=[2, 2])]
    model = make_model(nodes, {"x": [1, 3, 4, 4]}, ["y"],
                       {"wt1": _w(3, C, 2, 2), "bt1": _w(C), "wt2": _w(C, 2, 2, 2)})
    check(model)


def test_grouped_conv_loses_whole_groups():
    """A grouped conv (group=2) couples channels in blocks; the group attribute shrinks."""
    model = sandwich([N("Conv", ["a", "wg"], ["g"], name="cg", group=2, kernel_shape=[1, 1]),
                      N("Relu", ["g"], ["b"])], {"wg": _w(6, C // 2, 1, 1)}, c2_in=6)
    group = c1_group(model)
    assert group.size == 2 and group.unit_width == C // 2
    pruned = masked_equivalence(model, {group.id: np.array([1])})[0]
    cg = next(n for n in pruned.graph.node if n.op_type == "Conv" and
              any(a.name == "group" for a in n.attribute))
    assert next(a.i for a in cg.attribute if a.name == "group") == 1


def test_depthwise_conv_couples_in_and_out():
    """Depthwise conv (group == channels): c1's filters, the dw filters and c2's inputs."""
    model = sandwich([N("Conv", ["a", "wd", "bd"], ["b"], name="dw", group=C,
                        kernel_shape=[3, 3], pads=[1, 1, 1, 1])],
                     {"wd": _w(C, 1, 3, 3), "bd": _w(C)})
    group = c1_group(model)
    assert group.size == C and any("dw" in m for m in group.members)
    check(model)


def test_gemm_transposes_and_matmul_with_left_weight():
    """Gemm with transA/transB and a MatMul whose constant weight is on the left."""
    nodes = [N("Gemm", ["x", "w1", "b1"], ["h"], name="g1", transB=1),
             N("Relu", ["h"], ["r"]),
             N("Transpose", ["r"], ["rt"], perm=[1, 0]),
             N("Gemm", ["rt", "w2"], ["z"], name="g2", transA=1),
             N("Tanh", ["z"], ["zt"]),
             N("Transpose", ["zt"], ["zc"], perm=[1, 0]),
             N("MatMul", ["wl", "zc"], ["m"], name="ml"),
             N("Relu", ["m"], ["mr"]),
             N("MatMul", ["w3", "mr"], ["y"], name="ml2")]
    model = make_model(nodes, {"x": [4, 6]}, ["y"],
                       {"w1": _w(10, 6), "b1": _w(10), "w2": _w(10, 7), "wl": _w(5, 7),
                        "w3": _w(3, 5)})
    groups = {g.source: g for g in coupled_groups(model)}
    for name in ("g1", "g2", "ml"):
        assert groups[name].prunable, (name, groups[name].reason)
        masked_equivalence(model, {groups[name].id: np.array([0, 2])})


def test_batched_matmul_on_3d_activations():
    """MatMul on [batch, seq, hidden] with a 2-D weight, plus a bias Add."""
    nodes = [N("MatMul", ["x", "w1"], ["h"], name="up"), N("Add", ["h", "b1"], ["hb"]),
             N("Relu", ["hb"], ["r"]), N("MatMul", ["r", "w2"], ["y"], name="down")]
    model = make_model(nodes, {"x": [2, 5, 6]}, ["y"],
                       {"w1": _w(6, 12), "b1": _w(12), "w2": _w(12, 4)})
    group = next(g for g in coupled_groups(model) if g.source == "up")
    assert group.kind == "neurons"
    check(model, group)


def test_weights_as_constant_nodes_and_identity_chains():
    """Weights from Constant nodes and behind Identity are constants (sliced per use)."""
    w1 = helper.make_tensor("w1c", TensorProto.FLOAT, [C, 3, 1, 1], _w(C, 3, 1, 1).ravel())
    nodes = [N("Constant", [], ["w1"], value=w1), N("Identity", ["w1"], ["w1i"]),
             N("Conv", ["x", "w1i"], ["a"], name="c1", kernel_shape=[1, 1]),
             N("Conv", ["a", "w2"], ["y"], name="c2", kernel_shape=[1, 1])]
    model = make_model(nodes, {"x": [1, 3, 4, 4]}, ["y"], {"w2": _w(2, C, 1, 1)})
    check(model)


def test_shared_constant_is_copied_on_write():
    """Two nodes sharing one per-channel constant: each use is sliced on its own."""
    nodes = [N("Conv", ["x", "w1"], ["a"], name="c1", kernel_shape=[1, 1]),
             N("Mul", ["a", "k"], ["am"]),
             N("Conv", ["x", "w3"], ["c"], name="c3", kernel_shape=[1, 1]),
             N("Mul", ["c", "k"], ["cm"]),
             N("Conv", ["am", "w2"], ["y1"], name="c2", kernel_shape=[1, 1]),
             N("Conv", ["cm", "w4"], ["y2"], name="c4", kernel_shape=[1, 1])]
    model = make_model(nodes, {"x": [1, 3, 4, 4]}, ["y1", "y2"],
                       {"w1": _w(C, 3, 1, 1), "w3": _w(C, 3, 1, 1), "k": _w(C, 1, 1),
                        "w2": _w(2, C, 1, 1), "w4": _w(2, C, 1, 1)})
    groups = {g.source: g for g in coupled_groups(model)}
    assert groups["c1"].id != groups["c3"].id  # the shared constant does not couple them
    pruned = masked_equivalence(model, {groups["c1"].id: np.array([1])})[0]
    dims = sorted(tuple(i.dims) for i in pruned.graph.initializer if i.name.startswith("k"))
    assert dims == [(C - 1, 1, 1), (C, 1, 1)]


def test_graph_view_group_listing_and_to_dict():
    """coupled_groups lists source, size, members and prunability; to_dict is JSON-ready."""
    import json

    model = sandwich([N("Relu", ["a"], ["b"])])
    groups = coupled_groups(model)
    d = [g.to_dict() for g in groups]
    json.dumps(d)
    c1 = next(x for x in d if x["source"] == "c1")
    assert c1["prunable"] and c1["size"] == C and c1["kind"] == "channels"
    assert any("w2" in m and "(in)" in m for m in c1["members"])
    c2 = next(x for x in d if x["source"] == "c2")
    assert not c2["prunable"] and "graph output" in c2["reason"]


# --------------------------------------------------------------------------- barriers

BARRIERS = {
    "layernorm": ([N("LayerNormalization", ["a", "g", "be"], ["b"], axis=1)],
                  {"g": np.ones((C, 6, 6), np.float32), "be": np.zeros((C, 6, 6), np.float32)},
                  "LayerNormalization 'b' normalizes over axis 1"),
    "softmax": ([N("Softmax", ["a"], ["b"], axis=1)], {}, "normalizes over axis 1"),
    "reduce_channel": ([N("ReduceSum", ["a", "ax"], ["s"], keepdims=1),
                        N("Add", ["a", "s"], ["b"])], {"ax": np.array([1], np.int64)},
                       "ReduceSum 's' reduces over axis 1"),
    "slice_step": ([N("Slice", ["a", "st", "en", "ax", "sp"], ["b"])],
                   {"st": np.array([0], np.int64), "en": np.array([8], np.int64),
                    "ax": np.array([1], np.int64), "sp": np.array([2], np.int64)},
                   "slices axis 1 with step 2"),
    "reshape_regroup": ([N("Reshape", ["a", "s1"], ["r"]), N("Reshape", ["r", "s2"], ["b"])],
                        {"s1": np.array([2, 12, 4, 6], np.int64),
                         "s2": np.array([2, C, 6, 6], np.int64)}, "regroups axes"),
    "gather_runtime": ([N("Gather", ["a", "idx"], ["b"], axis=1)], {},
                       "Gather 'b' gathers computed indices along axis 1"),
    "pad_channel": ([N("Pad", ["a", "pads"], ["b"])],
                    {"pads": np.array([0, 1, 0, 0, 0, 0, 0, 0], np.int64)}, "pads axis 1"),
    "resize_channel": ([N("Resize", ["a", "", "sc"], ["b"], mode="nearest")],
                       {"sc": np.array([1, 2, 1, 1], np.float32)}, "resizes axis 1"),
    "groupnorm": ([N("GroupNormalization", ["a", "gs", "gb"], ["b"], num_groups=2)],
                  {"gs": np.ones(C, np.float32), "gb": np.zeros(C, np.float32)},
                  "GroupNormalization"),
    "tile": ([N("Tile", ["a", "rep"], ["b"])], {"rep": np.array([1, 2, 1, 1], np.int64)},
             "repeats axis 1"),
    "unknown_op": ([N("Foo", ["a"], ["b"], domain="custom.ops")], {},
                   "custom.ops::Foo 'b' has no coupling handler"),
    "maxpool_indices": ([N("MaxPool", ["a"], ["b", "ind"], kernel_shape=[2, 2])], {},
                        "indices"),
}


@pytest.mark.parametrize("case", sorted(BARRIERS))
def test_barriers_block_the_group_with_a_reason(case):
    """Each barrier makes c1's group unprunable and names the op and axis."""
    middle, inits, reason = BARRIERS[case]
    c2_in = {"pad_channel": C + 1, "tile": 2 * C, "resize_channel": 2 * C}.get(case, C)
    extra = ["ind"] if case == "maxpool_indices" else []
    domains = {"custom.ops": 1} if case == "unknown_op" else None
    opset = 21 if case == "groupnorm" else 17
    extra_in = [("idx", [C], TensorProto.INT64)] if case == "gather_runtime" else None
    if case == "unknown_op":
        model = _unchecked_sandwich(middle, inits, domains)
    else:
        model = sandwich(middle, inits, c2_in=c2_in, extra_outputs=extra, opset=opset,
                         extra_inputs=extra_in)
    group = c1_group(model)
    assert not group.prunable
    assert reason in group.reason, group.reason


def _unchecked_sandwich(middle, inits, domains):
    """A sandwich whose middle op has no schema (custom domain): built without the checker."""
    import onnx

    nodes = [N("Conv", ["x", "w1"], ["a"], name="c1", kernel_shape=[1, 1]), *middle,
             N("Conv", ["b", "w2"], ["y"], name="c2", kernel_shape=[1, 1])]
    weights = {"w1": _w(C, 3, 1, 1), "w2": _w(4, C, 1, 1)}
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    *[helper.make_opsetid(d, v)
                                                      for d, v in domains.items()]])
    model.ir_version = 10
    return model


def test_graph_input_and_output_are_barriers():
    """A group touching a graph input (Add with x2) or a graph output (a) is blocked."""
    model = sandwich([N("Add", ["a", "x2"], ["b"])],
                     extra_inputs=[("x2", [2, C, 6, 6], TensorProto.FLOAT)])
    group = c1_group(model)
    assert not group.prunable and "'x2' is a graph input" in group.reason
    model = sandwich([N("Relu", ["a"], ["b"])], extra_outputs=["a"])
    group = c1_group(model)
    assert not group.prunable and "'a' is a graph output" in group.reason


def test_subgraph_use_is_a_barrier():
    """A tensor read inside an If branch stops its group (If has no handler)."""
    then = helper.make_graph([N("Relu", ["a"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    other = helper.make_graph([N("Sigmoid", ["a"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    model = sandwich([N("If", ["cond"], ["b"], then_branch=then, else_branch=other)],
                     {"cond": np.array(True)})
    group = c1_group(model)
    assert not group.prunable and "If" in group.reason


def test_fused_attention_op_rows_and_heads():
    """com.microsoft::Attention: the hidden units it reads are its packed weight's rows; its
    own heads form a group of 12-column blocks (Q, K, V of one head) that ends at the graph
    output (prune-heads owns heads)."""
    nodes = [N("MatMul", ["x", "w"], ["h"], name="proj"),
             N("Attention", ["h", "qkv", "qb"], ["y"], domain="com.microsoft", num_heads=2)]
    model = _attention_model(nodes)
    groups = analyze(model).groups
    group = next(g for g in groups if g.source == "proj")
    assert group.prunable and group.size == 8
    heads = next(g for g in groups if g.source_op == "Attention")
    assert heads.size == 2 and not heads.prunable and "graph output" in heads.reason


def _attention_model(nodes):
    import onnx

    weights = {"w": _w(8, 8), "qkv": _w(8, 24), "qb": _w(24)}
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8])],
        [onnx.numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model


def test_unknown_shape_is_a_barrier():
    """An axis whose size inference cannot tell blocks the group."""
    model = _unchecked_sandwich([N("Foo", ["a"], ["f"], domain="custom.ops"),
                                 N("Relu", ["f"], ["b"])], {}, {"custom.ops": 1})
    group = c1_group(model)
    assert not group.prunable


def test_head_split_makes_block_units():
    """Reshape hidden -> (heads, head_dim) makes a unit a block of head_dim channels."""
    nodes = [N("MatMul", ["x", "wq"], ["q"], name="q"),
             N("Reshape", ["q", "split"], ["qh"]),
             N("Relu", ["qh"], ["qr"]),
             N("Reshape", ["qr", "merge"], ["m"]),
             N("MatMul", ["m", "wo"], ["y"], name="o")]
    model = make_model(nodes, {"x": [2, 5, 16]}, ["y"],
                       {"wq": _w(16, 16), "wo": _w(16, 16),
                        "split": np.array([2, 5, 4, 4], np.int64),
                        "merge": np.array([2, 5, 16], np.int64)})
    group = next(g for g in coupled_groups(model) if g.source == "q")
    assert group.kind == "blocks" and group.size == 4 and group.unit_width == 4
    assert group.prunable


def test_graph_without_weight_ops_has_no_groups():
    """A graph with no Conv/Gemm/MatMul weight has no groups (and nothing breaks)."""
    model = make_model([N("Relu", ["x"], ["y"])], {"x": [1, 4]}, ["y"])
    assert coupled_groups(model) == []
