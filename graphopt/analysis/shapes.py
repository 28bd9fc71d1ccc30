"""Shape inference, with concrete dims from user-given input shapes.

1. ORT's symbolic shape inference runs first (it knows ``com.microsoft`` ops and keeps
   symbolic dims); where it fails, onnx's shape inference (with data propagation) runs.
2. Inference runs on ``stripped_copy(model)``: the graph without the bytes of large
   weights, built without reading or touching them, so inference costs neither a copy of
   the weights nor the 2 GB protobuf limit. (Swapping the bytes out of the model and back
   in, as ``weights_stripped`` does, leaves a dead copy of every weight in the message's
   upb arena until the model is freed: +1x model size per call.)
3. Stale ``value_info`` is dropped first: after a rewrite an exporter's old shapes are wrong,
   and onnxruntime refuses a model whose value_info disagrees with its graph.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import logging
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import onnx

from graphopt.ir.model import _copy_field, iter_tensors
from graphopt.ir.model import copy_tensor_without_data as _copy_tensor_without_data

logger = logging.getLogger(__name__)

_STRIP_BYTES = 4096


@contextlib.contextmanager
def weights_stripped(model: onnx.ModelProto) -> Iterator[onnx.ModelProto]:
    """Temporarily empty large tensors' raw_data (dims are kept); restore on exit.

    Each use leaves a dead copy of the weights in the model's arena (see the module doc):
    to work on a copy, use ``stripped_copy`` instead.
    """
    moved = []
    for t in iter_tensors(model.graph):
        if t.HasField("raw_data") and len(t.raw_data) > _strip_limit(t):
            moved.append((t, t.raw_data))
            t.ClearField("raw_data")
    try:
        yield model
    finally:
        for t, raw in moved:
            t.raw_data = raw


def _large(tensor: onnx.TensorProto) -> bool:
    """raw_data over _STRIP_BYTES, judged from dims and type: reading ``raw_data`` (or
    ``ByteSize``/``ListFields``) would copy the bytes."""
    if not tensor.HasField("raw_data"):
        return False
    n = 1
    for d in tensor.dims:
        n *= d
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        return len(tensor.raw_data) > _STRIP_BYTES
    return n * itemsize > _strip_limit(tensor)


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
            _copy_tensor_without_data(init, copy)
        else:
            copy.CopyFrom(init)
    if not initializers_only:
        for tensor in iter_tensors(graph):
            if _large(tensor):
                tensor.ClearField("raw_data")
    return work


def fix_input_shapes(model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Write concrete dims into the graph inputs, in place."""
    for vi in model.graph.input:
        if vi.name in input_shapes:
            dims = vi.type.tensor_type.shape.dim
            for d, value in zip(dims, input_shapes[vi.name]):
                d.Clear()
                d.dim_value = int(value)


@functools.lru_cache(maxsize=1)
def _symbolic_class():
    """ORT's ``SymbolicShapeInference``, loaded from its file.

    ``import onnxruntime.tools.symbolic_shape_infer`` runs ``onnxruntime/tools/__init__``,
    which imports torch whenever torch is installed: ~2-3 s and ~300 MB per process for
    nothing. The module itself needs only numpy, onnx, sympy and packaging.
    """
    name = "onnxruntime.tools.symbolic_shape_infer"
    if name in sys.modules:
        return sys.modules[name].SymbolicShapeInference
    spec = importlib.util.find_spec("onnxruntime")
    path = None
    if spec is not None and spec.origin:
        path = Path(spec.origin).parent / "tools" / "symbolic_shape_infer.py"
    if path is None or not path.is_file():
        return importlib.import_module(name).SymbolicShapeInference
    file_spec = importlib.util.spec_from_file_location("graphopt._ort_symbolic_shape_infer", path)
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.SymbolicShapeInference


def _symbolic(model: onnx.ModelProto) -> onnx.ModelProto:
    """ORT's symbolic inference, driven step by step: its ``infer_shapes`` writes
    ``sym_shape_infer_temp.onnx`` and uuid-named ``.data`` files into the current folder
    whenever inference is incomplete, which would litter the user's folder."""
    cls = _symbolic_class()
    engine = cls(2**31 - 1, True, True, 0)  # int_max, auto_merge, guess_output_rank, verbose
    engine._preprocess(_data_less_as_inputs(model))
    complete = False
    while engine.run_:
        complete = engine._infer_impl()
    engine._update_output_from_vi()
    if not complete:
        raise RuntimeError("incomplete symbolic shape inference")
    return engine.out_mp_


def _data_less_as_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a stripped model whose data-less initializers are graph inputs of the same
    type and shape: the symbolic inference reads the values of initializers feeding an
    elementwise op (e.g. a large bias of an Add) and fails on an emptied one."""
    empty = [t for t in model.graph.initializer if _data_less(t)]
    if not empty:
        return model
    work = onnx.ModelProto()
    work.CopyFrom(model)
    names = {t.name for t in empty}
    kept = [t for t in work.graph.initializer if t.name not in names]
    del work.graph.initializer[:]
    work.graph.initializer.extend(kept)
    declared = {vi.name for vi in work.graph.input}
    for t in empty:
        if t.name not in declared:
            work.graph.input.append(onnx.helper.make_tensor_value_info(
                t.name, t.data_type, list(t.dims)))
    return work


def _data_less(t: onnx.TensorProto) -> bool:
    n = 1
    for d in t.dims:
        n *= d
    return n > 0 and not t.HasField("raw_data") and t.data_location != \
        onnx.TensorProto.EXTERNAL and not any(len(getattr(t, f)) for f in (
            "float_data", "int32_data", "int64_data", "double_data", "uint64_data",
            "string_data"))


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
    work = stripped_copy(model)
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
    inferred_outputs = {vi.name: vi for vi in inferred.graph.output}
    for vi in model.graph.output:
        # Outputs declared without a shape take the inferred one.
        new = inferred_outputs.get(vi.name)
        if new is not None and not vi.type.tensor_type.HasField("shape") and \
                new.type.tensor_type.HasField("shape"):
            vi.type.CopyFrom(new.type)
    return model


def tensor_shapes(
    model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]] | None = None
) -> dict[str, tuple[int | str | None, ...]]:
    """Shape of every tensor the inference could type: name -> dims (int, symbol or None)."""
    work = stripped_copy(model)
    if input_shapes:
        # Declared output dims (often symbolic) would otherwise hide the concrete ones.
        for vi in work.graph.output:
            vi.type.tensor_type.ClearField("shape")
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
