"""The weight layers sparsity works on, and the one matrix view every criterion uses.

A *weight layer* is a MatMul, Gemm or Conv node whose weight is an initializer. Every
criterion sees its weight as a matrix ``Wt`` of shape [outputs, reduction] (one row per
output unit, the columns in the order the layer's input features are summed), so that:

1. N:M groups are M consecutive columns of one row, which is the layout TensorRT's sparse
   kernels require (as Polygraphy's ``polygraphy.tools.sparse`` checks it): for MatMul
   ``W[K, N]`` along K (axis 0); for Gemm along K (axis 0, or axis 1 with ``transB=1``); for
   Conv ``W[O, C, kh, kw]`` along the input channels C (axis 1), separately for every output
   channel and kernel position. The Conv matrix therefore orders its columns (kh, kw, C),
   C fastest; ``graphopt.sparsity.hessian`` permutes the calibration Grams of
   ``graphopt.data.gram`` (im2col columns in the weight's own (C, kh, kw) order) into it.
2. The layer's input ``X`` (rows = tokens or output pixels, columns = the same reduction
   order) gives ``Y = X @ Wt.T``; ``XᵀX`` is the layer Hessian of SparseGPT.

``weight_layers(model)`` lists the layers, and the sites it refuses with the reason
(weight not an initializer, shared by several nodes, batched MatMul weight, ...).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

logger = logging.getLogger(__name__)

OPS = ("MatMul", "Gemm", "Conv")


@dataclass
class WeightLayer:
    """One weight layer; ``axis`` is the reduction axis of the stored weight."""

    index: int  # position of the node in the graph
    name: str  # node name (or its first output when unnamed)
    op: str
    weight: str  # initializer name
    shape: tuple[int, ...]
    axis: int
    activation: str  # the tensor the weight multiplies
    trans_input: bool = False  # Gemm transA: the activation is [K, T]
    kernel: tuple[int, ...] = ()  # Conv: kernel dims
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    group: int = 1

    @property
    def rows(self) -> int:
        return self.shape[0] if self.op == "Conv" else self.shape[1 - self.axis]

    @property
    def reduction(self) -> int:
        """Length of the reduction axis N:M groups run along (C for Conv, K otherwise)."""
        return self.shape[self.axis]

    @property
    def columns(self) -> int:
        if self.op == "Conv":
            return int(np.prod(self.shape[1:]))
        return self.shape[self.axis]

    @property
    def params(self) -> int:
        return int(np.prod(self.shape))

    def to_matrix(self, w: np.ndarray) -> np.ndarray:
        """The stored weight as ``Wt`` [outputs, reduction] (see the module doc)."""
        if self.op == "Conv":
            return np.moveaxis(w, 1, -1).reshape(w.shape[0], -1)
        return w.T if self.axis == 0 else w

    def from_matrix(self, wt: np.ndarray) -> np.ndarray:
        """Inverse of ``to_matrix``: back to the stored layout."""
        if self.op == "Conv":
            o, c = self.shape[0], self.shape[1]
            return np.moveaxis(wt.reshape(o, *self.shape[2:], c), -1, 1)
        return wt.T if self.axis == 0 else wt

    def describe(self) -> str:
        return f"{self.op} '{self.name}' ({self.weight} {list(self.shape)})"


@dataclass(frozen=True)
class Refused:
    site: str
    reason: str


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def weight_layers(model: onnx.ModelProto, ops=OPS) -> tuple[list[WeightLayer], list[Refused]]:
    """Weight layers of the main graph in graph order, and the refused sites with reasons."""
    inits = initializers(model)
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    layers: list[WeightLayer] = []
    refused: list[Refused] = []
    for i, node in enumerate(model.graph.node):
        if node.op_type not in ops or node.domain not in ("", "ai.onnx"):
            continue
        label = node.name or node.output[0]
        site = f"{node.op_type} '{label}'"
        w_name = node.input[1] if len(node.input) > 1 else ""
        if node.op_type == "MatMul" and node.input[0] in inits and w_name not in inits:
            refused.append(Refused(site, "the constant is the left operand (A); only B "
                                         "weights are handled"))
            continue
        if w_name not in inits:
            if node.op_type != "MatMul":  # MatMul of two activations is not a weight layer
                refused.append(Refused(site, "its weight is not an initializer"))
            continue
        t = inits[w_name]
        if t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE,
                               onnx.TensorProto.FLOAT16):
            refused.append(Refused(site, f"weight type "
                                         f"{onnx.TensorProto.DataType.Name(t.data_type)} "
                                         "is not a float type"))
            continue
        if uses.get(w_name, 0) > 1:
            refused.append(Refused(site, f"weight '{w_name}' is shared by {uses[w_name]} "
                                         "node inputs"))
            continue
        shape = tuple(int(d) for d in t.dims)
        kw = {}
        if node.op_type == "MatMul":
            if len(shape) != 2:
                refused.append(Refused(site, f"weight of rank {len(shape)} (batched MatMul)"))
                continue
            axis = 0
        elif node.op_type == "Gemm":
            if len(shape) != 2:
                refused.append(Refused(site, f"weight of rank {len(shape)}"))
                continue
            axis = 1 if _attr(node, "transB", 0) else 0
            kw["trans_input"] = bool(_attr(node, "transA", 0))
        else:
            if len(shape) < 3:
                refused.append(Refused(site, f"weight of rank {len(shape)}"))
                continue
            if _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
                refused.append(Refused(site, "auto_pad is set (explicit pads are needed for "
                                             "the im2col Gram)"))
                continue
            axis = 1
            nd = len(shape) - 2
            kw.update(kernel=shape[2:], strides=tuple(_attr(node, "strides", [1] * nd)),
                      pads=tuple(_attr(node, "pads", [0] * 2 * nd)),
                      dilations=tuple(_attr(node, "dilations", [1] * nd)),
                      group=int(_attr(node, "group", 1)))
        layers.append(WeightLayer(i, label, node.op_type, w_name, shape, axis, node.input[0],
                                  **kw))
    return layers, refused


def read_weight(model_or_inits, layer: WeightLayer) -> np.ndarray:
    inits = model_or_inits if isinstance(model_or_inits, dict) else initializers(model_or_inits)
    return numpy_helper.to_array(inits[layer.weight])


def write_weight(inits: dict[str, onnx.TensorProto], name: str, value: np.ndarray) -> None:
    """Replace an initializer's values in place (same name, dtype and dims)."""
    t = inits[name]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
    t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value.astype(dtype)), name))


def nm_violations(w: np.ndarray, axis: int, n: int, m: int) -> int:
    """Groups of ``m`` consecutive entries along ``axis`` holding more than ``n`` non-zeros."""
    moved = np.moveaxis(w, axis, -1)
    if moved.shape[-1] % m:
        raise ValueError(f"axis {axis} of {list(w.shape)} is not a multiple of {m}")
    groups = moved.reshape(*moved.shape[:-1], -1, m)
    return int(((groups != 0).sum(-1) > n).sum())


def sparsity(w: np.ndarray) -> float:
    return float((w == 0).mean()) if w.size else 0.0
