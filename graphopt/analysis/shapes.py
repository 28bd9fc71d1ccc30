"""Shape inference, with concrete dims from user-given input shapes.

1. ORT's symbolic shape inference runs first (it knows ``com.microsoft`` ops and keeps
   symbolic dims); where it fails, onnx's shape inference (with data propagation) runs.
2. Large weights are swapped out of the proto while inference runs and put back after, so
   inference costs neither a copy of the weights nor the 2 GB protobuf limit.
3. Stale ``value_info`` is dropped first: after a rewrite an exporter's old shapes are wrong,
   and onnxruntime refuses a model whose value_info disagrees with its graph.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping

import onnx

from ..model import iter_tensors

logger = logging.getLogger(__name__)

_STRIP_BYTES = 4096


@contextlib.contextmanager
def weights_stripped(model: onnx.ModelProto) -> Iterator[onnx.ModelProto]:
    """Temporarily empty large tensors' raw_data (dims are kept); restore on exit."""
    moved = []
    for t in iter_tensors(model.graph):
        if t.HasField("raw_data") and len(t.raw_data) > _STRIP_BYTES:
            moved.append((t, t.raw_data))
            t.ClearField("raw_data")
    try:
        yield model
    finally:
        for t, raw in moved:
            t.raw_data = raw


def fix_input_shapes(model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Write concrete dims into the graph inputs, in place."""
    for vi in model.graph.input:
        if vi.name in input_shapes:
            dims = vi.type.tensor_type.shape.dim
            for d, value in zip(dims, input_shapes[vi.name]):
                d.Clear()
                d.dim_value = int(value)


def _symbolic(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    return SymbolicShapeInference.infer_shapes(model, auto_merge=True, guess_output_rank=True)


def _onnx(model: onnx.ModelProto) -> onnx.ModelProto:
    return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)


def infer_shapes(
    model: onnx.ModelProto,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    *,
    symbolic: bool = True,
) -> onnx.ModelProto:
    """Fill ``model.graph.value_info`` (in place) and return the model.

    With ``input_shapes`` the inferred dims are concrete; the model's own inputs are not
    changed (the fixed dims live only in ``value_info``... and are removed again by the
    next re-inference without them).
    """
    del model.graph.value_info[:]
    with weights_stripped(model):
        work = onnx.ModelProto()
        work.CopyFrom(model)
    if input_shapes:
        fix_input_shapes(work, input_shapes)
    inferred = None
    if symbolic:
        try:
            inferred = _symbolic(work)
        except Exception as exc:  # noqa: BLE001 - third-party inference fails in many ways
            logger.debug("symbolic shape inference failed (%s); using onnx's", exc)
    if inferred is None:
        try:
            inferred = _onnx(work)
        except Exception as exc:  # noqa: BLE001
            logger.warning("shape inference failed: %s", exc)
            return model
    known = {vi.name for vi in model.graph.input} | {vi.name for vi in model.graph.output}
    for vi in inferred.graph.value_info:
        if vi.name not in known:
            model.graph.value_info.append(vi)
    return model


def tensor_shapes(
    model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]] | None = None
) -> dict[str, tuple[int | str | None, ...]]:
    """Shape of every tensor the inference could type: name -> dims (int, symbol or None)."""
    work = onnx.ModelProto()
    with weights_stripped(model):
        work.CopyFrom(model)
    infer_shapes(work, input_shapes)
    if input_shapes:
        fix_input_shapes(work, input_shapes)
    shapes: dict[str, tuple[int | str | None, ...]] = {}
    for vi in list(work.graph.input) + list(work.graph.value_info) + list(work.graph.output):
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            continue
        shapes[vi.name] = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim
        )
    for init in model.graph.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes
