"""The graph as the coupling analysis sees it: slots, members, per-node couplings, and
``GraphView`` (producers, consumers, concrete shapes, constants folded through
constant-only subgraphs).

See ``graphopt.analysis.coupling`` for the vocabulary.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import onnx
from onnx import numpy_helper
from graphopt.ir.graph import GraphIndex

logger = logging.getLogger(__name__)

_FOLD_ANY_SIZE = {"Identity", "Cast", "Reshape", "Squeeze", "Unsqueeze", "Transpose"}
_FOLD_SMALL = {
    "Concat", "Slice", "Gather", "ConstantOfShape", "Add", "Sub", "Mul", "Div", "Range",
    "Equal", "Where", "Expand", "Neg", "Abs", "Min", "Max", "Floor", "Ceil", "Sqrt", "Pow",
    "ReduceProd", "ReduceSum", "Not", "Less", "Greater", "Mod", "Tile", "Split", "Flatten",
}
_FOLD_LIMIT = 1 << 16
class Slot(NamedTuple):
    """Where values live: ``use`` is None for an activation tensor, ``(node, input)`` for one
    use of a constant, ``(node, -1)`` for a virtual axis of a node."""

    tensor: str
    use: tuple[int, int] | None = None

    @property
    def is_const(self) -> bool:
        return self.use is not None and self.use[1] >= 0

    @property
    def is_virtual(self) -> bool:
        return self.use is not None and self.use[1] < 0


class Member(NamedTuple):
    slot: Slot
    axis: int


class HandlerError(Exception):
    """A handler cannot say how this node maps its axes; the message is the reason."""


@dataclass
class NodeCoupling:
    """What one node says about its axes."""

    links: list[tuple[Member, Member, np.ndarray, np.ndarray]] = field(default_factory=list)
    blocks: dict[Member, str] = field(default_factory=dict)
    free: set[Member] = field(default_factory=set)
    roles: dict[Member, str] = field(default_factory=dict)
    virtual_dims: dict[Slot, int] = field(default_factory=dict)
    seeds: list[Member] = field(default_factory=list)
    # members proven to carry attention heads (a QKᵀ contraction feeding Softmax, or a
    # fused attention op): member -> (head_dim, atoms per query head on that member)
    heads: dict[Member, tuple[int, int]] = field(default_factory=dict)
    failure: str | None = None  # the handler failed: every visited member is blocked
    by_member: dict[Member, list[int]] = field(default_factory=dict)

    def index(self) -> None:
        self.by_member = {}
        for i, (a, b, _, _) in enumerate(self.links):
            self.by_member.setdefault(a, []).append(i)
            self.by_member.setdefault(b, []).append(i)


class GraphView:
    """Read-only lookups over a model for handlers: producers, consumers, shapes, constants."""

    def __init__(self, model: onnx.ModelProto, shapes: Mapping[str, tuple] | None = None,
                 input_shapes: Mapping[str, tuple[int, ...]] | None = None):
        from graphopt.ir.inputs import resolve_shapes

        self.model = model
        self.graph = model.graph
        self.index = index = GraphIndex(model.graph)
        self.nodes = index.nodes
        self.opsets = {o.domain or "": o.version for o in model.opset_import}
        self.initializers = index.initializers
        self.constant_nodes = {n.output[0]: n for n in self.nodes
                               if n.op_type == "Constant" and n.output}
        # positions: producing node index; (node index, input slot), -1 = a subgraph read
        self.producer: dict[str, int] = index.position
        self.consumers: dict[str, list[tuple[int, int]]] = index.slots
        self.graph_inputs = index.graph_inputs - set(self.initializers)
        self.graph_outputs = index.graph_outputs
        if shapes is None:
            try:
                shapes = _all_shapes(model, resolve_shapes(model, input_shapes))
            except Exception as exc:  # noqa: BLE001 - analysis still works where dims are known
                logger.warning("shape inference failed (%s); coupling uses constants only", exc)
                shapes = {}
        self.shapes = dict(shapes)
        self._const_cache: dict[str, np.ndarray | None] = {}
        self.virtual_dims: dict[Slot, int] = {}
        self._input_shapes = input_shapes
        self._alt_shapes: dict[str, tuple] | None = None

    def varying(self, name: str) -> tuple[bool, ...] | None:
        """Which axes of ``name`` follow the model's dynamic input dims (batch, sequence):
        shapes are inferred a second time with every dynamic input dim doubled (once per
        view, on first use); None where either inference left ``name`` unknown or the
        model has no dynamic input dims."""
        if self._alt_shapes is None:
            self._alt_shapes = _doubled_shapes(self.model, self._input_shapes)
        a, b = self.shape(name), self._alt_shapes.get(name)
        if a is None or b is None or len(a) != len(b) or not self._alt_shapes:
            return None
        if any(not isinstance(d, int) for d in b):
            return None
        return tuple(int(x) != int(y) for x, y in zip(a, b))

    # ------------------------------------------------------------------ constants
    def opset(self, domain: str = "") -> int:
        return self.opsets.get(domain, self.opsets.get("ai.onnx", 0)) if domain == "" else \
            self.opsets.get(domain, 0)

    def const(self, name: str) -> np.ndarray | None:
        """The value of ``name`` if it is a constant (folded through constant-only ops)."""
        if not name:
            return None
        if name in self._const_cache:
            return self._const_cache[name]
        if name in self.initializers:  # big weights are not kept twice in memory
            return numpy_helper.to_array(self.initializers[name])
        self._const_cache[name] = None  # guards cycles
        value = self._const_value(name)
        self._const_cache[name] = value
        return value

    def is_const(self, name: str) -> bool:
        if name in self.initializers or name in self.constant_nodes:
            return True
        if name in self.graph_inputs or name not in self.producer:
            return False
        return self.const(name) is not None

    def is_static(self, name: str) -> bool:
        """``name`` is a constant that does not depend on any runtime tensor's shape (an
        initializer, a Constant, or folded from those only). A value folded through
        ``Shape`` of an activation holds the analysis' example dims and must not be
        written back into the graph."""
        if name in self.initializers or name in self.constant_nodes:
            return True
        if not self.is_const(name):
            return False
        seen: set[str] = set()
        stack = [name]
        while stack:
            cur = stack.pop()
            if cur in seen or cur in self.initializers or cur in self.constant_nodes:
                continue
            seen.add(cur)
            if cur not in self.producer:
                return False
            node = self.nodes[self.producer[cur]]
            if node.op_type == "Shape" and not (node.input[0] in self.initializers or
                                                node.input[0] in self.constant_nodes):
                return False
            stack.extend(i for i in node.input if i)
        return True

    def _const_value(self, name: str) -> np.ndarray | None:
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        if name in self.constant_nodes:
            from graphopt.ir.graph import constant_node_value

            return constant_node_value(self.constant_nodes[name])
        if name in self.graph_inputs or name not in self.producer:
            return None
        node = self.nodes[self.producer[name]]
        if node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type == "Shape":
            shape = self.shape(node.input[0])
            if shape is None:
                return None
            start = _attr(node, "start", 0)
            end = _attr(node, "end", None)
            return np.array(shape[start:end], dtype=np.int64)
        if node.op_type not in _FOLD_ANY_SIZE | _FOLD_SMALL:
            return None
        values = []
        for inp in node.input:
            if not inp:
                values.append(None)
                continue
            v = self.const(inp)
            if v is None:
                return None
            if node.op_type not in _FOLD_ANY_SIZE and v.size > _FOLD_LIMIT:
                return None
            values.append(v)
        if node.op_type == "Identity":
            return values[0]
        try:
            out = _evaluate(node, values, self.opset())
        except Exception as exc:  # noqa: BLE001 - a fold that fails is just not a constant
            logger.debug("cannot fold %s (%s): %s", node.name, node.op_type, exc)
            return None
        if out is not None and node.op_type not in _FOLD_ANY_SIZE and out.size > _FOLD_LIMIT:
            return None
        return out

    # ------------------------------------------------------------------ shapes
    def shape(self, name: str) -> tuple[int, ...] | None:
        """Concrete dims of ``name`` or None."""
        if name in self.initializers:
            return tuple(int(d) for d in self.initializers[name].dims)
        if name in self.constant_nodes:
            v = self.const(name)
            return None if v is None else tuple(v.shape)
        dims = self.shapes.get(name)
        if dims is None:
            if name in self.producer and name in self._const_cache and \
                    self._const_cache[name] is not None:
                return tuple(self._const_cache[name].shape)
            return None
        if any(not isinstance(d, int) or d < 0 for d in dims):
            return None
        return tuple(dims)

    def slot(self, node_idx: int, input_idx: int) -> Slot:
        """The slot node input ``input_idx`` reads: a constant use or an activation."""
        name = self.nodes[node_idx].input[input_idx]
        if self.is_const(name):
            return Slot(name, (node_idx, input_idx))
        return Slot(name)

    def member_dim(self, m: Member) -> int | None:
        if m.slot.is_virtual:
            return self.virtual_dims.get(m.slot)
        shape = self.shape(m.slot.tensor)
        if shape is None and m.slot.is_const:
            v = self.const(m.slot.tensor)
            shape = None if v is None else v.shape
        if shape is None or m.axis >= len(shape):
            return None
        return int(shape[m.axis])

    def node_label(self, idx: int) -> str:
        node = self.nodes[idx]
        return f"{node.op_type} '{node.name or node.output[0]}'"

    def describe(self, m: Member) -> str:
        if m.slot.is_virtual:
            return f"{self.node_label(m.slot.use[0])} groups"
        if m.slot.is_const:
            return f"{self.node_label(m.slot.use[0])} input {m.slot.use[1]} " \
                   f"'{m.slot.tensor}' axis {m.axis}"
        return f"'{m.slot.tensor}' axis {m.axis}"

    def nodes_touching(self, slot: Slot) -> list[int]:
        if slot.use is not None:
            return [slot.use[0]]
        out = []
        if slot.tensor in self.producer:
            out.append(self.producer[slot.tensor])
        out.extend(idx for idx, _ in self.consumers.get(slot.tensor, []))
        return list(dict.fromkeys(out))


def _all_shapes(model: onnx.ModelProto, input_shapes) -> dict[str, tuple]:
    """Shapes from ``tensor_shapes``; where the symbolic inference left a tensor without
    concrete dims, onnx's own inference (with data propagation) fills it in."""
    from graphopt.analysis.shapes import fix_input_shapes, tensor_shapes
    from graphopt.ir.strip import stripped_copy

    shapes = dict(tensor_shapes(model, input_shapes))

    def concrete(name: str) -> bool:
        dims = shapes.get(name)
        return dims is not None and all(isinstance(d, int) and d >= 0 for d in dims)

    if all(concrete(o) for n in model.graph.node for o in n.output if o):
        return shapes
    work = stripped_copy(model)
    del work.graph.value_info[:]
    fix_input_shapes(work, input_shapes)
    try:
        inferred = onnx.shape_inference.infer_shapes(work, strict_mode=False, data_prop=True)
    except Exception as exc:  # noqa: BLE001
        logger.debug("onnx shape inference failed: %s", exc)
        return shapes
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        if concrete(vi.name) or not vi.type.tensor_type.HasField("shape"):
            continue
        dims = tuple(d.dim_value if d.HasField("dim_value") else None
                     for d in vi.type.tensor_type.shape.dim)
        if all(isinstance(d, int) for d in dims):
            shapes[vi.name] = dims
    return shapes


def _doubled_shapes(model: onnx.ModelProto, input_shapes) -> dict[str, tuple]:
    from graphopt.ir.inputs import input_specs, resolve_shapes

    resolved = resolve_shapes(model, input_shapes)
    alt, dynamic = {}, False
    for spec in input_specs(model):
        dims = resolved.get(spec.name)
        if dims is None:
            continue
        new = tuple(2 * d if not isinstance(sd, int) else d for d, sd in zip(dims, spec.dims))
        dynamic |= new != tuple(dims)
        alt[spec.name] = new
    if not dynamic:
        return {}
    try:
        return _all_shapes(model, alt)
    except Exception as exc:  # noqa: BLE001 - without it, reshapes fall back to the default
        logger.debug("second shape inference failed: %s", exc)
        return {}


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _fold_numpy(node: onnx.NodeProto, values: list) -> np.ndarray | None:
    """The common shape-arithmetic ops in numpy (the reference evaluator is slow to build)."""
    op = node.op_type
    x = values[0] if values else None
    if op == "Cast":
        return x.astype(onnx.helper.tensor_dtype_to_np_dtype(_attr(node, "to")))
    if op == "Concat":
        return np.concatenate([v for v in values if v is not None], axis=_attr(node, "axis"))
    if op == "Reshape" and not _attr(node, "allowzero", 0):
        shape = [int(d) if d != 0 else x.shape[k] for k, d in enumerate(values[1])]
        return x.reshape(shape)
    if op == "Transpose":
        return np.transpose(x, _attr(node, "perm"))
    if op in ("Unsqueeze", "Squeeze") and len(values) > 1 and values[1] is not None:
        axes = [int(a) for a in np.atleast_1d(values[1])]
        if op == "Squeeze":
            return np.squeeze(x, axis=tuple(axes))
        out = x
        for a in sorted(a + out.ndim + len(axes) if a < 0 else a for a in axes):
            out = np.expand_dims(out, a)
        return out
    if op == "ConstantOfShape":
        fill = _attr(node, "value")
        value = numpy_helper.to_array(fill) if fill is not None else np.zeros(1, np.float32)
        return np.full(tuple(int(d) for d in x), value.reshape(-1)[0], dtype=value.dtype)
    if op in ("Add", "Sub", "Mul") and len(values) == 2:
        fn = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}[op]
        return fn(x, values[1]).astype(np.result_type(x, values[1]))
    if op == "Gather":
        return np.take(x, values[1], axis=_attr(node, "axis", 0))
    return None


def _evaluate(node: onnx.NodeProto, values: list, opset: int) -> np.ndarray | None:
    from onnx.reference import ReferenceEvaluator

    if node.domain in ("", "ai.onnx"):
        try:
            out = _fold_numpy(node, values)
        except Exception:  # noqa: BLE001 - fall back to the reference evaluator
            out = None
        if out is not None:
            return np.asarray(out)

    inputs = [f"i{k}" if v is not None else "" for k, v in enumerate(values)]
    clone = onnx.helper.make_node(node.op_type, inputs, ["o"], domain=node.domain)
    clone.attribute.extend(node.attribute)
    in_vis = [onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(v.dtype),
                                                 list(v.shape))
              for n, v in zip(inputs, values) if n]
    out_vi = onnx.helper.make_tensor_value_info("o", onnx.TensorProto.UNDEFINED, None)
    g = onnx.helper.make_graph([clone], "fold", in_vis, [out_vi])
    m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", max(opset, 7))])
    feeds = {n: v for n, v in zip(inputs, values) if n}
    return np.asarray(ReferenceEvaluator(m).run(None, feeds)[0])
