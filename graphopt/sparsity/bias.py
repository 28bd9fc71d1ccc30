"""A constant shift of a weight layer's outputs, absorbed into the bias that follows it.

After sparsifying ``Wt`` to ``W'``, the least-squares bias change given ``W'`` is
``c = mean(T − b) − W' mean(X)`` (``graphopt.sparsity.hessian.LayerStats``: the mean of the
original outputs and of the current inputs on the calibration rows): it removes the mean
of the output error and lowers ``‖X W'ᵀ + c − (T − b)‖²`` by ``n‖c‖²``, never raising it.
Inputs after GELU or ReLU have a large mean, so zeroing half of a row's weights shifts
the outputs, and the shift is what ``c`` takes back.

``absorb_shift(model, layer, c)`` adds ``c`` where the layer's bias is:

1. Gemm, Conv: their bias input (``C``, ``B``) when it is an initializer read by this node
   only, of N elements along its last axis (a one-element bias is widened to N); without a
   bias input, one is added.
2. MatMul: the one ``Add`` that reads its output (nothing else does), whose other operand is
   an initializer read by that Add only with N elements along its last axis and size
   1 elsewhere (``[N]``, ``[1, 1, N]``).

Anything else returns the reason and leaves the model as it is.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .layers import WeightLayer, initializers


def _uses(model: onnx.ModelProto, name: str) -> int:
    return sum(1 for node in model.graph.node for x in node.input if x == name) + \
        sum(1 for o in model.graph.output if o.name == name)


def _added(old: np.ndarray, c: np.ndarray) -> np.ndarray:
    if old.size == 1:
        return (old.reshape(-1)[0] + c).astype(old.dtype)
    return (old + c.reshape(old.shape)).astype(old.dtype)


def _replace(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    for i, t in enumerate(model.graph.initializer):
        if t.name == name:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(value, name))
            return


def absorb_shift(model: onnx.ModelProto, layer: WeightLayer, c: np.ndarray | None
                 ) -> str | None:
    """Add ``c`` ([N] output shift) to the layer's bias (module doc); None when done, else
    why not. ``c=None`` only checks (nothing is written)."""
    node = model.graph.node[layer.index]
    inits = initializers(model)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(inits[layer.weight].data_type)
    if layer.op in ("Gemm", "Conv"):
        if len(node.input) > 2 and node.input[2]:
            name = node.input[2]
            if name not in inits or _uses(model, name) > 1:
                return f"its bias '{name}' is not an initializer of its own"
            old = numpy_helper.to_array(inits[name])
            n = layer.rows
            if old.size != 1 and (old.size != n or old.shape[-1] != n):
                return f"its bias '{name}' is not one value per output"
            if c is not None:
                _replace(model, name, _added(old, c))
            return None
        if c is None:
            return None
        name = f"{layer.weight}__bias"
        taken = {t.name for t in model.graph.initializer} | {
            x for n in model.graph.node for x in list(n.input) + list(n.output)}
        while name in taken:
            name += "_"
        model.graph.initializer.append(numpy_helper.from_array(c.astype(dtype), name))
        if len(node.input) == 2:
            node.input.append(name)
        else:
            node.input[2] = name
        return None
    out = node.output[0]
    readers = [n for n in model.graph.node if out in n.input]
    if len(readers) != 1 or readers[0].op_type != "Add" or _uses(model, out) != 1:
        return "its output does not go to one bias Add"
    add = readers[0]
    other = [x for x in add.input if x != out]
    if len(other) != 1 or other[0] not in inits or _uses(model, other[0]) > 1:
        return "the Add after it has no bias initializer of its own"
    old = numpy_helper.to_array(inits[other[0]])
    n = layer.rows
    if old.size != n or (old.shape and old.shape[-1] != n):
        return f"the bias '{other[0]}' is not one value per output"
    if c is not None:
        _replace(model, other[0], (old + c.reshape(old.shape)).astype(old.dtype))
    return None
