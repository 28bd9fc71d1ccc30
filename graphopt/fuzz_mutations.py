"""Mutations for the fuzzer (``graphopt.fuzzing``): each takes a model and a numpy
Generator and returns the mutated model, or None when it does not apply.

Test helpers, like ``graphopt.testing``: library code never imports this module.

*Valid* mutations keep a model onnxruntime runs: Identity/Dropout on an edge, explicit
Pad -> pool/Conv branches with random pads, pad values, kernels, dilation, strides and
ceil_mode, Conv pads moved into an explicit Pad, BatchNormalization, Shape reads, stale
declared dims, overridable initializers, If branches reading outer names and holding their
own weights, model-local functions, sparse weights, the ``ai.onnx`` domain alias, shuffled
node order, outputs without shape, duplicated initializers, foldable constants.
*Breaking* mutations make it invalid: a dropped edge, a wrong dtype or rank, a truncated
initializer, a bad attribute, a cycle, a huge dim, an external-data location outside the
folder, an empty graph, duplicate node names.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

F32 = np.float32


# --------------------------------------------------------------------------- helpers


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _float4d(model: onnx.ModelProto) -> list[str]:
    """Rank-4 float tensors of the top-level graph (inputs and node outputs)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001
        return []
    inits = {t.name for t in model.graph.initializer}
    names = []
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + \
            list(inferred.graph.output):
        tt = vi.type.tensor_type
        if (vi.name not in inits and tt.elem_type == TensorProto.FLOAT and tt.HasField("shape")
                and len(tt.shape.dim) == 4):
            names.append(vi.name)
    return sorted(set(names))


def _fresh(model: onnx.ModelProto, base: str) -> str:
    taken = {o for n in model.graph.node for o in list(n.output) + list(n.input)}
    taken |= {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer}
    i = 0
    while f"fz_{base}_{i}" in taken:
        i += 1
    return f"fz_{base}_{i}"


def _add_output(model: onnx.ModelProto, name: str, rank: int = 4) -> None:
    model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                                            [None] * rank))


def _channels(model: onnx.ModelProto, name: str) -> int | None:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info):
        if vi.name == name:
            d = vi.type.tensor_type.shape.dim[1]
            return d.dim_value or None
    return None


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))] if items else None


# --------------------------------------------------------------------------- valid mutations


def m_identity(model, rng):
    op = "Dropout" if rng.random() < 0.3 else "Identity"
    t = _pick(rng, _float4d(model) if op == "Dropout" else
              [o for n in model.graph.node for o in n.output if o])
    if t is None:
        return None
    new = _fresh(model, "id")
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            if name == t:
                node.input[k] = new
    model.graph.node.append(helper.make_node(op, [t], [new]))
    for out in model.graph.output:
        if out.name == t and rng.random() < 0.5:
            out.name = new
    return model


def m_pad_pool(model, rng):
    """A side branch t -> [act] -> Pad(random) -> pool or Conv(random window) -> output."""
    t = _pick(rng, _float4d(model))
    if t is None:
        return None
    nodes, src = [], t
    act = _pick(rng, ["Relu", "Sigmoid", "none", "Abs"])
    if act != "none":
        src = _fresh(model, "act")
        nodes.append(helper.make_node(act, [t], [src]))
    op = _pick(rng, ["MaxPool", "MaxPool", "AveragePool", "LpPool", "Conv"])
    k = [int(rng.choice([1, 2, 2, 3])) for _ in range(2)]
    pads = [int(rng.choice([0, 0, 1, 1, 2])) for _ in range(4)]
    own = [int(rng.integers(0, kk)) for kk in k + k]
    value = 0.0 if op != "MaxPool" else float(_pick(rng, [0.0, -1.0, -np.inf, 0.5]))
    names = [_fresh(model, "pads"), _fresh(model, "val")]
    model.graph.initializer.extend([
        numpy_helper.from_array(np.array([0, 0, pads[0], pads[1], 0, 0, pads[2], pads[3]],
                                         np.int64), names[0]),
        numpy_helper.from_array(np.array(value, F32), names[1])])
    padded = _fresh(model, "padded")
    nodes.append(helper.make_node("Pad", [src, names[0], names[1]], [padded]))
    attrs = {"kernel_shape": k, "strides": [int(rng.integers(1, 3)) for _ in range(2)],
             "pads": own}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    dilated = {"MaxPool": 10, "Conv": 1, "AveragePool": 19, "LpPool": 18}[op]
    if rng.random() < 0.6 and opset >= dilated:
        attrs["dilations"] = [int(rng.choice([1, 2, 3])) for _ in range(2)]
    out = _fresh(model, "pool")
    if op == "Conv":
        c = _channels(model, t)
        if c is None:
            return None
        w = _fresh(model, "w")
        model.graph.initializer.append(numpy_helper.from_array(
            rng.standard_normal((2, c) + tuple(k)).astype(F32), w))
        attrs.pop("kernel_shape")
        nodes.append(helper.make_node("Conv", [padded, w], [out], **attrs))
    else:
        if rng.random() < 0.4 and (op != "LpPool" or opset >= 18):
            attrs["ceil_mode"] = 1
        if op == "AveragePool":
            attrs["count_include_pad"] = int(rng.integers(0, 2))
        nodes.append(helper.make_node(op, [padded], [out], **attrs))
    model.graph.node.extend(nodes)
    _add_output(model, out)
    return model


def m_move_conv_pads(model, rng):
    convs = [n for n in model.graph.node if n.op_type == "Conv" and any(
        a.name == "pads" and any(a.ints) for a in n.attribute)]
    conv = _pick(rng, convs)
    if conv is None:
        return None
    attr = next(a for a in conv.attribute if a.name == "pads")
    spatial = len(attr.ints) // 2
    moved = [int(rng.integers(0, p + 1)) for p in attr.ints]
    pads = _fresh(model, "pads")
    model.graph.initializer.append(numpy_helper.from_array(np.array(
        [0, 0] + moved[:spatial] + [0, 0] + moved[spatial:], np.int64), pads))
    padded = _fresh(model, "padded")
    model.graph.node.append(helper.make_node("Pad", [conv.input[0], pads], [padded]))
    conv.input[0] = padded
    left = [p - m for p, m in zip(attr.ints, moved)]
    del attr.ints[:]
    attr.ints.extend(left)
    return model


def m_batchnorm(model, rng):
    t = _pick(rng, _float4d(model))
    c = _channels(model, t) if t else None
    if not c:
        return None
    names = [_fresh(model, f"bn{i}") for i in range(5)]
    model.graph.initializer.extend([
        numpy_helper.from_array(rng.standard_normal((c, c, 1, 1)).astype(F32), names[0]),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, c).astype(F32), names[1]),
        numpy_helper.from_array(rng.standard_normal(c).astype(F32), names[2]),
        numpy_helper.from_array(rng.standard_normal(c).astype(F32) * 0.1, names[3]),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, c).astype(F32), names[4])])
    conv, out = _fresh(model, "conv"), _fresh(model, "bn")
    model.graph.node.extend([
        helper.make_node("Conv", [t, names[0]], [conv]),
        helper.make_node("BatchNormalization", [conv] + names[1:], [out])])
    _add_output(model, out)
    return model


def m_shape_read(model, rng):
    t = _pick(rng, _float4d(model))
    if t is None:
        return None
    s, f = _fresh(model, "shape"), _fresh(model, "shapef")
    model.graph.node.extend([helper.make_node("Shape", [t], [s]),
                             helper.make_node("Cast", [s], [f], to=TensorProto.FLOAT)])
    _add_output(model, f, rank=1)
    return model


def m_stale_declaration(model, rng):
    """Static dims declared where the model has dynamic ones (an exporter's leftovers)."""
    vis = [o for o in model.graph.output if o.type.tensor_type.HasField("shape")]
    if rng.random() < 0.5:
        vis += list(model.graph.value_info)
    vi = _pick(rng, vis)
    if vi is None:
        return None
    for d in vi.type.tensor_type.shape.dim:
        if not d.HasField("dim_value"):
            d.Clear()
            d.dim_value = int(rng.integers(1, 9))
    return model


def m_overridable(model, rng):
    inputs = {i.name for i in model.graph.input}
    t = _pick(rng, [t for t in model.graph.initializer if t.name not in inputs
                    and t.data_type == TensorProto.FLOAT and len(t.dims) <= 1])
    if t is None or model.ir_version < 4:
        return None
    model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return model


def m_if_branch(model, rng):
    """If(ReduceSum(x) > 0) whose branches read an outer tensor (read nowhere else), one
    holding its own weight."""
    t = _pick(rng, _float4d(model))
    x = model.graph.input[0].name
    channels = _channels(model, t) if t else None
    if t is None or channels is None:
        return None
    src, s, c, out, w = (_fresh(model, n) for n in ("ifsrc", "sum", "cond", "if", "bw"))
    then_g = helper.make_graph([helper.make_node("Mul", [src, w], ["then_out"])], "then", [],
                               [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, None)],
                               [numpy_helper.from_array(rng.standard_normal(
                                   (1, channels, 1, 1)).astype(F32), w)])
    else_g = helper.make_graph([helper.make_node("Neg", [src], ["else_out"])], "else", [],
                               [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, None)])
    first = [helper.make_node("ReduceSum", [x], [s], keepdims=0),
             helper.make_node("Greater", [s, _zero(model)], [c]),
             helper.make_node("Relu", [t], [src])]
    node = helper.make_node("If", [c], [out], then_branch=then_g, else_branch=else_g)
    # Half the time the If comes before the producers it reads (onnxruntime runs that; the
    # checker wants it sorted, so graphopt must sort it, counting the branches' reads).
    model.graph.node.extend(first + [node] if rng.random() < 0.5 else [node] + first)
    _add_output(model, out)
    return model


def _zero(model) -> str:
    name = _fresh(model, "zero")
    model.graph.initializer.append(numpy_helper.from_array(np.array(0.0, F32), name))
    return name


def m_local_function(model, rng):
    relus = [n for n in model.graph.node if n.op_type == "Relu" and n.domain == ""]
    node = _pick(rng, relus)
    if node is None:
        return None
    if not any(f.name == "LocalRelu" for f in model.functions):
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        model.functions.append(helper.make_function(
            "fz.local", "LocalRelu", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])],
            [helper.make_opsetid("", opset)]))
        model.opset_import.append(helper.make_opsetid("fz.local", 1))
    node.op_type, node.domain = "LocalRelu", "fz.local"
    return model


def m_sparse_weight(model, rng):
    convs = {n.input[1] for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 1}
    inputs = {i.name for i in model.graph.input}
    t = _pick(rng, [t for t in model.graph.initializer if t.name in convs
                    and t.name not in inputs and t.data_type == TensorProto.FLOAT])
    if t is None or model.ir_version < 4:
        return None
    dense = numpy_helper.to_array(t)
    flat = dense.reshape(-1)
    nz = np.flatnonzero(flat)
    model.graph.sparse_initializer.append(helper.make_sparse_tensor(
        numpy_helper.from_array(flat[nz], t.name),
        numpy_helper.from_array(nz.astype(np.int64), t.name + "_indices"), list(dense.shape)))
    keep = [i for i in model.graph.initializer if i.name != t.name]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return model


def m_domain_alias(model, rng):
    for node in model.graph.node:
        if node.domain == "" and rng.random() < 0.5:
            node.domain = "ai.onnx"
    return model


def m_shuffle(model, rng):
    nodes = list(model.graph.node)
    order = rng.permutation(len(nodes))
    del model.graph.node[:]
    model.graph.node.extend(nodes[i] for i in order)
    return model


def m_shapeless_output(model, rng):
    vi = _pick(rng, list(model.graph.output))
    if vi is None:
        return None
    vi.type.tensor_type.ClearField("shape")
    return model


def m_duplicate_initializer(model, rng):
    inputs = {i.name for i in model.graph.input}
    t = _pick(rng, [t for t in model.graph.initializer if t.name not in inputs])
    readers = [n for n in model.graph.node if t is not None and t.name in n.input]
    if t is None or not readers:
        return None
    copy = onnx.TensorProto()
    copy.CopyFrom(t)
    copy.name = _fresh(model, "dup")
    model.graph.initializer.append(copy)
    node = _pick(rng, readers)
    node.input[list(node.input).index(t.name)] = copy.name
    if model.ir_version < 4:
        model.graph.input.append(helper.make_tensor_value_info(copy.name, t.data_type,
                                                               list(t.dims)))
    return model


def m_foldable(model, rng):
    t = _pick(rng, _float4d(model))
    if t is None:
        return None
    a, b, ab, out = (_fresh(model, n) for n in ("ca", "cb", "cab", "fold"))
    model.graph.node.extend([
        helper.make_node("Constant", [], [a], value=numpy_helper.from_array(
            np.array(rng.standard_normal(), F32))),
        helper.make_node("Constant", [], [b], value=numpy_helper.from_array(
            np.array(rng.standard_normal(), F32))),
        helper.make_node("Mul", [a, b], [ab]), helper.make_node("Add", [t, ab], [out])])
    _add_output(model, out)
    return model


VALID: dict[str, Callable] = {
    "identity": m_identity, "pad_pool": m_pad_pool, "pad_pool2": m_pad_pool,
    "move_conv_pads": m_move_conv_pads, "batchnorm": m_batchnorm, "shape_read": m_shape_read,
    "stale_declaration": m_stale_declaration, "overridable": m_overridable,
    "if_branch": m_if_branch, "local_function": m_local_function,
    "sparse_weight": m_sparse_weight, "domain_alias": m_domain_alias, "shuffle": m_shuffle,
    "shapeless_output": m_shapeless_output, "duplicate_initializer": m_duplicate_initializer,
    "foldable": m_foldable,
}


# --------------------------------------------------------------------------- breaking mutations


def b_drop_edge(model, rng):
    node = _pick(rng, [n for n in model.graph.node if n.input])
    if node is None:
        return None
    node.input[0] = "fz_missing"
    return model


def b_dtype(model, rng):
    model.graph.input[0].type.tensor_type.elem_type = int(_pick(rng, [TensorProto.INT64,
                                                                      TensorProto.DOUBLE]))
    return model


def b_rank(model, rng):
    model.graph.input[0].type.tensor_type.shape.dim.add().dim_value = 1
    return model


def b_truncated_initializer(model, rng):
    t = _pick(rng, [t for t in model.graph.initializer if len(t.raw_data) > 8])
    if t is None:
        return None
    t.raw_data = t.raw_data[: len(t.raw_data) // 2]
    return model


def b_attribute(model, rng):
    node = _pick(rng, [n for n in model.graph.node if any(a.name == "kernel_shape"
                                                           or a.name == "strides"
                                                           for a in n.attribute)])
    if node is None:
        return None
    for a in node.attribute:
        if a.name in ("kernel_shape", "strides"):
            del a.ints[:]
            a.ints.extend([0, -1])
    return model


def b_cycle(model, rng):
    if len(model.graph.node) < 2:
        return None
    first, last = model.graph.node[0], model.graph.node[len(model.graph.node) - 1]
    first.input[0] = last.output[0]
    return model


def b_huge_dim(model, rng):
    t = _pick(rng, list(model.graph.initializer))
    if t is None:
        return None
    del t.dims[:]
    t.dims.extend([2**40, 2])
    return model


def b_external_outside(model, rng):
    t = _pick(rng, list(model.graph.initializer))
    if t is None:
        return None
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "../../outside.bin"), ("offset", "0")):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return model


def b_empty_graph(model, rng):
    x = model.graph.input[0]
    del model.graph.node[:]
    del model.graph.output[:]
    model.graph.output.append(x)
    return model


def b_duplicate_names(model, rng):
    for node in model.graph.node:
        node.name = "same"
    return model


BREAKING: dict[str, Callable] = {
    "drop_edge": b_drop_edge, "dtype": b_dtype, "rank": b_rank,
    "truncated_initializer": b_truncated_initializer, "attribute": b_attribute,
    "cycle": b_cycle, "huge_dim": b_huge_dim, "external_outside": b_external_outside,
    "empty_graph": b_empty_graph, "duplicate_names": b_duplicate_names,
}
