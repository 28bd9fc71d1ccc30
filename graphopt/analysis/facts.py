"""Shapes the model proves, as opposed to shapes it declares.

Exporters leave stale declarations behind (``value_info``, graph outputs' dims), and
onnxruntime runs such models correctly, so a declared dim is a hint, never a fact. What the
model proves is what follows from its inputs' declared dims (onnxruntime checks every fed
tensor against them) and its ops alone: ``proven_shapes`` infers from those, after dropping
``value_info`` and the graph outputs' shapes. An initializer that is also a graph input is
a default the caller may override, so its input declaration counts, not its dims.
"""

from __future__ import annotations

import logging

import onnx

logger = logging.getLogger(__name__)

Dims = tuple[int | None, ...]


def proven_shapes(model: onnx.ModelProto) -> dict[str, Dims]:
    """Name -> dims (an int where the dim is proven static, else None) for every tensor of
    the top-level graph whose rank inference finds; empty when inference fails."""
    from graphopt.ir.graph import shape_skeleton

    work = shape_skeleton(model)
    graph = work.graph
    if model.ir_version >= 4:
        inputs = {i.name for i in graph.input}
        kept = [t for t in graph.initializer if t.name not in inputs]
        del graph.initializer[:]
        graph.initializer.extend(kept)
    for out in graph.output:
        if out.type.HasField("tensor_type"):
            out.type.tensor_type.ClearField("shape")
    del graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(work, strict_mode=False, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - inference fails in many ways; facts are then none
        logger.debug("shape inference for proven shapes failed: %s", exc)
        return {}
    shapes: dict[str, Dims] = {}
    values = list(inferred.graph.input) + list(inferred.graph.value_info) + \
        list(inferred.graph.output)
    for vi in values:
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type") or not tt.HasField("shape"):
            continue
        shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None
                                for d in tt.shape.dim)
    for t in graph.initializer:
        shapes[t.name] = tuple(int(d) for d in t.dims)
    return shapes
