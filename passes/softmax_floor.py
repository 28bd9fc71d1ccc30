"""``softmax-floor``: keep a masked attention Softmax out of float32's denormal range.

An additive attention mask (``scores + Where(mask, 0, finfo.min)``, ``-inf``, ``-10000``)
puts the masked scores far below the row maximum, and onnxruntime's CPU Softmax computes
``exp(x - max)`` of them through float32's denormal range (results below ``1e-38``): the
x86 microcode assists make it 5-12x slower per element than on unmasked rows (measured,
1 thread: 0.75 ns/element with every ``x - max >= -80``, 4-9 ns with masked entries; on
all-MiniLM-L6-v2 unpadded and int8 at batch 32 the Softmax was 18% of the run time). The
model cannot set flush-to-zero for whoever runs it; it can keep the values out of that
range.

1. A masked Softmax is a float32 ``Softmax`` over the last axis (opset 13 and later) whose
   input is ``Add(a, b)`` with one operand an additive mask: a tensor whose producers
   (selections, casts, shape ops, arithmetic; ``_MASK_OPS``) reach a constant at or below
   ``-1e4`` (or ``-inf``). Unmasked Softmaxes are left as they are (nothing to gain).
2. It becomes ``Softmax(Max(x, ReduceMax(x, -1) - 80))``: every entry more than 80 below
   its row's maximum is raised to exactly 80 below it, where ``exp`` is ``1.8e-35`` (a
   normal float). Such an entry's probability was below ``1.8e-35`` and now is at most
   that: the row's sum (at least 1, the maximum's own term) does not change in float32, and
   a context ``sum_j p_j v_j`` moves by at most ``L * 1.8e-35 * max|v|`` (under ``1e-26``
   for 512 keys and values up to ``1e6``), far below float32's resolution of any
   non-negligible value. Rows whose maximum is ``-inf`` (every key masked by ``-inf``) stay
   ``-inf`` and NaN as before; rows that are all ``finfo.min`` stay uniform.
3. Anything else (another dtype, axis or opset; no additive mask found) is a skip with the
   reason. The manager checks the result like every lossless pass.

Run it last among the float passes (after ``unpad-tokens``, whose attention clones then
each get their floor).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphopt.core.contract import Context, NoConfig, Pass, PassResult, Skip
from graphopt.core.registry import register
from graphopt.ir.graph import ONNX_DOMAINS, GraphIndex, attr, replace_nodes, shape_skeleton, \
    site, unique_name

FLOOR = 80.0          # exp(-80) = 1.8e-35 > float32's smallest normal, 1.2e-38
MASK_FILL = -1e4      # a constant at or below this in an Add operand makes it a mask
_MASK_OPS = {"Where", "Cast", "Expand", "Reshape", "Unsqueeze", "Squeeze", "Flatten",
             "Transpose", "Gather", "Slice", "Concat", "Tile", "Identity", "Mul", "Sub",
             "Add", "Neg", "Min", "Max", "Clip", "ConstantOfShape"}
_MAX_WALK = 60


def _is_mask(name: str, idx: GraphIndex) -> bool:
    """``name`` is an additive mask (module doc, 1)."""
    stack, seen = [name], set()
    while stack and len(seen) < _MAX_WALK:
        name = stack.pop()
        if not name or name in seen:
            continue
        seen.add(name)
        value = idx.value(name)
        if value is not None:
            if value.dtype.kind == "f" and value.size and float(np.min(value)) <= MASK_FILL:
                return True
            continue
        node = idx.producer.get(name)
        if node is None or node.domain not in ONNX_DOMAINS or node.op_type not in _MASK_OPS:
            continue
        if node.op_type == "ConstantOfShape":
            fill = attr(node, "value")
            if fill is not None and float(numpy_helper.to_array(fill).min()) <= MASK_FILL:
                return True
            continue
        stack.extend(node.input[1:] if node.op_type == "Where" else node.input)
    return False


def _types(model: onnx.ModelProto, ctx: Context) -> dict[str, tuple[int, int | None]]:
    """Element type and rank (None when unknown) of every tensor onnx's inference types."""
    from graphopt.analysis.shapes import infer_shapes

    work = infer_shapes(shape_skeleton(model), ctx.input_shapes, symbolic=False)
    out = {}
    for vi in list(work.graph.input) + list(work.graph.value_info) + list(work.graph.output):
        if vi.type.HasField("tensor_type"):
            t = vi.type.tensor_type
            out[vi.name] = (t.elem_type, len(t.shape.dim) if t.HasField("shape") else None)
    return out


@register
class SoftmaxFloor(Pass[NoConfig], name="softmax-floor", lossless=True):
    """Raise masked attention scores to 80 below their row's maximum before the Softmax;
    see the module docstring."""

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        graph = model.graph
        opset = next((o.version for o in model.opset_import if o.domain in ONNX_DOMAINS), 0)
        counters = {"softmaxes_floored": 0}
        softmaxes = [n for n in graph.node
                     if n.op_type == "Softmax" and n.domain in ONNX_DOMAINS]
        if not softmaxes:
            return PassResult(model, False, counters)
        if opset < 13:
            return PassResult(model, False, counters, [Skip(site(softmaxes[0]), (
                f"opset {opset} < 13: Softmax flattens to 2-D there"))])
        idx = GraphIndex(graph, model.ir_version)
        types: dict[str, tuple[int, int | None]] | None = None
        skipped: list[Skip] = []
        plans = []
        for node in softmaxes:
            axis = attr(node, "axis", -1)
            add = idx.producer.get(node.input[0])
            if add is None or add.op_type != "Add" or not any(_is_mask(i, idx)
                                                              for i in add.input):
                continue   # not a masked softmax: nothing to gain
            if types is None:
                types = _types(model, ctx)
            elem, rank = types.get(node.input[0], (None, None))
            if elem != TensorProto.FLOAT:
                skipped.append(Skip(site(node), f"input type {elem} is not float32 (the "
                                    f"floor of {FLOOR:g} is chosen for float32)"))
                continue
            if axis != -1 and (rank is None or axis != rank - 1):
                skipped.append(Skip(site(node), f"axis {axis} is not the last axis"))
                continue
            plans.append(node)
        if not plans:
            return PassResult(model, False, counters, skipped)
        taken = idx.all_names()
        floor = unique_name("graphopt_softmax_floor", taken)
        taken.add(floor)
        graph.initializer.append(numpy_helper.from_array(np.array(-FLOOR, np.float32), floor))
        axes = None
        if opset >= 18:
            axes = unique_name("graphopt_softmax_floor_axes", taken)
            taken.add(axes)
            graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), axes))
        replacements = {}
        for node in plans:
            x = node.input[0]
            names = [unique_name(f"{x}/{s}", taken) for s in ("row_max", "floor", "floored")]
            taken.update(names)
            reduce = (helper.make_node("ReduceMax", [x, axes], [names[0]], keepdims=1,
                                       name=names[0]) if axes else
                      helper.make_node("ReduceMax", [x], [names[0]], axes=[-1], keepdims=1,
                                       name=names[0]))
            new = [reduce,
                   helper.make_node("Add", [names[0], floor], [names[1]], name=names[1]),
                   helper.make_node("Max", [x, names[1]], [names[2]], name=names[2])]
            softmax = onnx.NodeProto()
            softmax.CopyFrom(node)
            softmax.input[0] = names[2]
            replacements[id(node)] = new + [softmax]
            counters["softmaxes_floored"] += 1
        replace_nodes(graph, replacements)
        return PassResult(model, True, counters, skipped)

