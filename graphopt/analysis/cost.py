"""Cost of a model: parameters, multiply-accumulates and weight bytes, total and per op type.

1. Parameters and bytes count every weight: initializers and ``Constant`` node tensors with
   more than one element, of a float or 8/4-bit integer (quantized) type. Scalars, shape
   vectors and int32/int64 index tables (position ids) are not parameters.
2. MACs need shapes; they come from shape inference with the user's input shapes, and
   dynamic dims take the defaults of ``graphopt.ir.inputs``. An op whose shapes cannot be
   inferred counts 0 MACs and is listed in ``unknown``.
3. MACs are counted for Conv, ConvTranspose, Gemm, MatMul (and their quantized/fused
   forms), the ONNX ``Attention`` op and ``com.microsoft`` Attention/MultiHeadAttention/
   GroupQueryAttention (Q·Kᵀ and the weighted sum of V).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx

from graphopt.ir.inputs import input_specs, resolve_shapes

_MATMUL_LIKE = {"MatMul", "MatMulInteger", "QLinearMatMul", "FusedMatMul"}
_PLUMBING = {"Shape", "Size", "CastLike", "Cast", "Identity"}
_ATTENTION = {"Attention", "MultiHeadAttention", "GroupQueryAttention"}


@dataclass
class Cost:
    params: int = 0
    macs: int = 0
    weight_bytes: int = 0
    params_by_op: dict[str, int] = field(default_factory=dict)
    macs_by_op: dict[str, int] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)
    # dynamic input dims the counts assumed (input -> {axis: value}): MACs are for these
    assumed: dict[str, dict[int, int]] = field(default_factory=dict)

    def assumed_text(self) -> str:
        """``images[0]=1, images[2]=16`` for the dims counted at a default size."""
        return ", ".join(f"{name}[{axis}]={value}" for name, dims in self.assumed.items()
                         for axis, value in dims.items())

    def to_dict(self) -> dict:
        return {
            "params": self.params,
            "macs": self.macs,
            "weight_bytes": self.weight_bytes,
            "params_by_op": self.params_by_op,
            "macs_by_op": self.macs_by_op,
            "unknown_shapes": self.unknown,
            "assumed_dims": {k: dict(v) for k, v in self.assumed.items()},
        }


def _prod(dims) -> int:
    return int(np.prod([int(d) for d in dims])) if len(dims) else 1


_NOT_WEIGHTS = {
    onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT16,
    onnx.TensorProto.UINT64, onnx.TensorProto.UINT32, onnx.TensorProto.UINT16,
    onnx.TensorProto.BOOL, onnx.TensorProto.STRING,
}


def _weights(model: onnx.ModelProto) -> dict[str, tuple[tuple[int, ...], int]]:
    """name -> (dims, itemsize) of every weight tensor in the main graph."""
    tensors = [(init.name, init) for init in model.graph.initializer]
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            tensors += [(node.output[0], a.t) for a in node.attribute if a.name == "value"]
    return {name: (tuple(t.dims), _itemsize(t.data_type)) for name, t in tensors
            if t.data_type not in _NOT_WEIGHTS}


def _itemsize(data_type: int) -> int:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).itemsize
    except (KeyError, TypeError):
        return 4


def count_cost(model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]] | None = None
               ) -> Cost:
    from .shapes import tensor_shapes

    cost = Cost()
    weights = _weights(model)
    params_by_op: Counter[str] = Counter()
    counted: set[str] = set()
    consumers: dict[str, str] = {}
    for node in model.graph.node:
        for name in node.input:
            # A weight is filed under the op that computes with it, not one that reads its
            # shape or type (dynamo exports put Shape/CastLike on conv weights first).
            if name not in consumers or consumers[name] in _PLUMBING:
                consumers[name] = node.op_type
    for name, (dims, itemsize) in weights.items():
        n = _prod(dims)
        if n <= 1 or name in counted:
            continue
        counted.add(name)
        cost.params += n
        cost.weight_bytes += n * itemsize
        params_by_op[consumers.get(name, "unused")] += n
    cost.params_by_op = dict(params_by_op.most_common())

    resolved = resolve_shapes(model, input_shapes)
    given = dict(input_shapes or {})
    for spec in input_specs(model):
        if spec.name in given:
            continue
        dims = {k: int(v) for k, (d, v) in enumerate(zip(spec.dims, resolved[spec.name]))
                if not isinstance(d, int)}
        if dims:
            cost.assumed[spec.name] = dims
    shapes = tensor_shapes(model, resolved)
    macs_by_op: Counter[str] = Counter()
    for node in model.graph.node:
        try:
            macs = _node_macs(node, shapes)
        except (KeyError, TypeError, ValueError, IndexError):
            macs = None
        if macs is None:
            if node.op_type in _MATMUL_LIKE | _ATTENTION | {"Conv", "ConvTranspose", "Gemm"}:
                cost.unknown.append(node.name or node.output[0])
            continue
        macs_by_op[node.op_type] += macs
    cost.macs = int(sum(macs_by_op.values()))
    cost.macs_by_op = dict(macs_by_op.most_common())
    return cost


def _concrete(shape) -> tuple[int, ...]:
    if shape is None or any(not isinstance(d, int) or d <= 0 for d in shape):
        raise ValueError("shape not concrete")
    return tuple(shape)


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _node_macs(node: onnx.NodeProto, shapes) -> int | None:
    op = node.op_type
    if op in ("Conv", "ConvTranspose", "QLinearConv", "ConvInteger"):
        w_index = 3 if op == "QLinearConv" else 1
        w = _concrete(shapes[node.input[w_index]])
        if op == "ConvTranspose":
            x = _concrete(shapes[node.input[0]])
            # each input element is scattered over the kernel for every output channel
            return _prod(x) * _prod(w[1:])
        y = _concrete(shapes[node.output[0]])
        # per output element: (C_in / group) * kernel
        return _prod(y) * _prod(w[1:])
    if op == "Gemm":
        a = _concrete(shapes[node.input[0]])
        y = _concrete(shapes[node.output[0]])
        k = a[0] if _attr(node, "transA", 0) else a[1]
        return _prod(y) * k
    if op in _MATMUL_LIKE:
        a_index = 0
        a = _concrete(shapes[node.input[a_index]])
        y = _concrete(shapes[node.output[0]])
        return _prod(y) * a[-1]
    if op in _ATTENTION:
        q = _concrete(shapes[node.output[0]])  # [batch, seq, hidden] (or 4-D)
        if len(q) == 4:
            batch, heads, seq, head = q
            hidden = heads * head
        else:
            batch, seq, hidden = q
        total_seq = seq
        if node.domain == "" and len(node.input) > 1 and node.input[1]:
            k = _concrete(shapes[node.input[1]])
            total_seq = k[-2] if len(k) == 4 else k[1]
        macs = 2 * batch * seq * total_seq * hidden
        if node.domain == "com.microsoft" and op == "Attention":
            w = _concrete(shapes[node.input[1]])  # fused QKV projection
            macs += batch * seq * _prod(w)
        return macs
    return None
