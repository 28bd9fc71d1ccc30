"""A weight-less copy of a model, for analysis and session outlines.

``stripped_copy(model)`` keeps every tensor's name, type and dims but not the bytes of large
ones, and is built without reading or touching the model's weights: shape inference and
checks on it cost neither a copy of the weights nor the 2 GB protobuf limit. (Swapping the
bytes out of the model and back in leaves a dead copy of every weight in the message's upb
arena until the model is freed: +1x model size per call, so this module never does it.)
"""

from __future__ import annotations

import onnx

from graphopt.ir.model import _copy_field, copy_tensor_without_data, iter_tensors, typed_bytes

_STRIP_BYTES = 4096


def _large(tensor: onnx.TensorProto) -> bool:
    """raw_data over _STRIP_BYTES, judged from dims and type: reading ``raw_data`` (or
    ``ByteSize``/``ListFields``) would copy the bytes."""
    if not tensor.HasField("raw_data"):
        return False
    try:
        onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    except (KeyError, TypeError, ValueError):
        return len(tensor.raw_data) > _STRIP_BYTES
    return typed_bytes(tensor) > _strip_limit(tensor)


# Integer tensors are shape-like data (position ids, index tables) that shape inference may
# read (e.g. a Slice of a [1, 512] position-id Constant); they are kept up to this size.
_KEEP_INT_BYTES = 1 << 16
_INT_TYPES = {onnx.TensorProto.INT64, onnx.TensorProto.INT32}


def _strip_limit(tensor: onnx.TensorProto) -> int:
    return max(_STRIP_BYTES, _KEEP_INT_BYTES) if tensor.data_type in _INT_TYPES \
        else _STRIP_BYTES


def stripped_copy(model: onnx.ModelProto, *, initializers_only: bool = False
                  ) -> onnx.ModelProto:
    """A copy of ``model`` whose large tensors keep name, type and dims but no data.

    The model is read, never changed, and the large initializers' bytes are never copied;
    large tensors in ``Constant`` nodes and subgraphs are copied with their node and then
    emptied, unless ``initializers_only``.
    """
    work = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            _copy_field(work, field, value)
    graph = work.graph
    for field, value in model.graph.ListFields():
        if field.name != "initializer":
            _copy_field(graph, field, value)
    for init in model.graph.initializer:
        copy = graph.initializer.add()
        if _large(init):
            copy_tensor_without_data(init, copy)
        else:
            copy.CopyFrom(init)
    if not initializers_only:
        for tensor in iter_tensors(graph):
            if _large(tensor):
                tensor.ClearField("raw_data")
    return work
