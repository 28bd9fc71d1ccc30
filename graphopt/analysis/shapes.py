"""Shape inference, with concrete dims from user-given input shapes.

1. ORT's symbolic shape inference runs first (it knows ``com.microsoft`` ops and keeps
   symbolic dims); where it fails, onnx's shape inference (with data propagation) runs.
2. Inference runs on ``ir.strip.stripped_copy(model)``: the graph without the bytes of
   large weights, built without reading or touching them, so inference costs neither a copy
   of the weights nor the 2 GB protobuf limit.
3. Stale ``value_info`` is dropped first: after a rewrite an exporter's old shapes are wrong,
   and onnxruntime refuses a model whose value_info disagrees with its graph.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import sys
from collections.abc import Mapping
from pathlib import Path

import onnx

from graphopt.ir.strip import stripped_copy

logger = logging.getLogger(__name__)


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
