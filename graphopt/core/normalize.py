"""Inputs onnxruntime runs but ``onnx.checker`` refuses, put right before any pass runs.

The manager checks every pass's result with the checker, so a model the checker refuses
from the start would have every changing pass rolled back, each blamed for what the input
already had. ``normalize`` (called by ``graphopt.optimize`` on its copy of the input)
rewrites what has one meaning, and refuses the rest with one line (``InvalidModelError``):

1. nodes in domain ``"ai.onnx"`` (an alias of the default domain): the domain becomes ``""``
   and an ``ai.onnx`` opset import merges into the default one (model and functions);
2. nodes out of topological order, in the graph and in every subgraph: sorted, stably;
   a cycle is refused, naming a node on it;
3. under IR < 4, an initializer not listed among the graph inputs (that IR requires it):
   listed;
4. a main-graph output declared without a shape: it takes the inferred one; one whose rank
   cannot be inferred is refused (the checker requires a shape there, and none can be
   written for an unknown rank); a main-graph input without a shape is refused likewise;
5. node names used twice in one graph (the checker lets them pass, onnxruntime refuses to
   load the model): the later ones get a ``_<k>`` suffix, unique in the model.

Then the model must pass the checks every pass's result gets (``check_input``): an
initializer whose bytes do not fill its dims (truncated), and whatever ``onnx.checker``
refuses (a dangling edge, a wrong attribute, ...), is refused with one line naming the
input, before any pass runs, rather than blamed on the first pass that changes something.

Returns what was changed, one line per kind, for the report.
"""

from __future__ import annotations

import logging

import onnx

from graphopt.errors import GraphoptError
from graphopt.ir.graph import subgraphs
from graphopt.ir.model import iter_graphs
from graphopt.ir.tidy import GraphCycleError, toposort

logger = logging.getLogger(__name__)

_ALIAS = "ai.onnx"


class InvalidModelError(GraphoptError):
    """The input model is not one graphopt can verify its work on."""


def _merge_alias_opsets(opsets) -> bool:
    alias = [o for o in opsets if o.domain == _ALIAS]
    if not alias:
        return False
    default = [o for o in opsets if o.domain == ""]
    version = max(o.version for o in alias + default)
    keep = [onnx.helper.make_opsetid(o.domain, o.version) for o in opsets
            if o.domain not in ("", _ALIAS)]
    del opsets[:]
    opsets.extend([onnx.helper.make_opsetid("", version)] + keep)
    return True


def _alias_domains(model: onnx.ModelProto) -> int:
    count = 0
    graphs = list(iter_graphs(model.graph))
    for fn in model.functions:
        for node in fn.node:
            if node.domain == _ALIAS:
                node.domain = ""
                count += 1
        _merge_alias_opsets(fn.opset_import)
        for node in fn.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    graphs.extend(iter_graphs(a.g))
    for g in graphs:
        for node in g.node:
            if node.domain == _ALIAS:
                node.domain = ""
                count += 1
    merged = _merge_alias_opsets(model.opset_import)
    return count + int(merged)


def _missing_shapes(model: onnx.ModelProto) -> list[str]:
    """Fill outputs declared without a shape from inference; returns their names."""
    from graphopt.analysis.shapes import infer_shapes
    from graphopt.ir.strip import stripped_copy

    graph = model.graph
    for vi in graph.input:
        if vi.type.HasField("tensor_type") and not vi.type.tensor_type.HasField("shape"):
            raise InvalidModelError(
                f"graph input '{vi.name}' declares no shape (onnx.checker requires one); "
                "declare at least its rank, with dim_param names for dynamic dims")
    missing = [vi.name for vi in graph.output if not vi.HasField("type") or (
        vi.type.HasField("tensor_type") and not vi.type.tensor_type.HasField("shape"))]
    if not missing:
        return []
    work = stripped_copy(model)
    for vi in work.graph.output:
        if vi.name in missing:
            vi.ClearField("type")
    infer_shapes(work, None)
    found = {vi.name: vi for vi in work.graph.output}
    unknown = [n for n in missing if n not in found or not _typed(found[n])]
    if unknown:
        found.update(_session_outputs(model, unknown))
    for vi in graph.output:
        if vi.name not in missing:
            continue
        new = found.get(vi.name)
        if new is None or not _typed(new):
            raise InvalidModelError(
                f"graph output '{vi.name}' declares no shape and its rank cannot be inferred "
                "(onnx.checker requires one); declare at least its rank")
        vi.type.CopyFrom(new.type)
    return missing


def _typed(vi: onnx.ValueInfoProto) -> bool:
    tt = vi.type.tensor_type
    return vi.type.HasField("tensor_type") and tt.HasField("shape") and bool(tt.elem_type)


def _session_outputs(model: onnx.ModelProto, names: list[str]) -> dict[str, onnx.ValueInfoProto]:
    """Output types as onnxruntime's own inference sees them (it knows its contrib ops,
    where onnx's and the symbolic inference may not), for the outputs in ``names``."""
    from graphopt.runtime.session import ort_session

    try:
        session = ort_session(model, lean=True)
    except Exception as exc:  # noqa: BLE001 - then the rank stays unknown and is refused
        logger.debug("onnxruntime cannot load the model to type its outputs: %s", exc)
        return {}
    elem = {vi.name: vi.type.tensor_type.elem_type for vi in model.graph.output}
    found = {}
    for meta in session.get_outputs():
        if meta.name not in names or not isinstance(meta.shape, list):
            continue
        dims = [d if isinstance(d, int) and d >= 0 else (d if isinstance(d, str) else None)
                for d in meta.shape]
        dtype = elem.get(meta.name) or _ORT_TYPES.get(meta.type, 0)
        found[meta.name] = onnx.helper.make_tensor_value_info(meta.name, dtype, dims)
    return found


_ORT_TYPES = {"tensor(float)": onnx.TensorProto.FLOAT, "tensor(float16)": onnx.TensorProto.FLOAT16,
              "tensor(double)": onnx.TensorProto.DOUBLE, "tensor(int64)": onnx.TensorProto.INT64,
              "tensor(int32)": onnx.TensorProto.INT32, "tensor(int8)": onnx.TensorProto.INT8,
              "tensor(uint8)": onnx.TensorProto.UINT8, "tensor(bool)": onnx.TensorProto.BOOL,
              "tensor(bfloat16)": onnx.TensorProto.BFLOAT16,
              "tensor(string)": onnx.TensorProto.STRING}


def _ir3_initializer_inputs(model: onnx.ModelProto) -> list[str]:
    """Under IR < 4 every initializer must also be a graph input (onnxruntime runs the model
    without; the checker refuses it): list the missing ones, typed from the tensor."""
    if model.ir_version >= 4:
        return []
    inputs = {i.name for i in model.graph.input}
    missing = [t for t in model.graph.initializer if t.name not in inputs]
    model.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type,
                                                                list(t.dims)) for t in missing)
    return [t.name for t in missing]


def _sort(graph: onnx.GraphProto) -> int:
    """Toposort ``graph``, then its subgraphs (taken after the sort, which rebuilds nodes)."""
    count = int(toposort(graph))
    for node in graph.node:
        for sub in subgraphs(node):
            count += _sort(sub)
    return count


def normalize(model: onnx.ModelProto) -> list[str]:
    """Put ``model`` right in place (see the module doc); returns what was done."""
    done = []
    aliased = _alias_domains(model)
    if aliased:
        done.append(f"domain '{_ALIAS}' written as the default domain '' ({aliased} places)")
    try:
        sorted_graphs = _sort(model.graph)
    except GraphCycleError as exc:
        raise InvalidModelError(str(exc)) from None
    if sorted_graphs:
        done.append(f"nodes put in topological order ({sorted_graphs} graph(s))")
    renamed = _unique_node_names(model)
    if renamed:
        done.append(f"node names used more than once made unique ({len(renamed)} renamed: "
                    f"{', '.join(renamed[:5])}{' ...' if len(renamed) > 5 else ''})")
    listed = _ir3_initializer_inputs(model)
    if listed:
        done.append(f"IR {model.ir_version}: initializers listed as graph inputs, as that IR "
                    f"requires: {', '.join(listed[:5])}{' ...' if len(listed) > 5 else ''}")
    filled = _missing_shapes(model)
    if filled:
        done.append(f"shapes inferred for graph outputs declared without one: "
                    f"{', '.join(filled)}")
    check_input(model)
    for line in done:
        logger.info("normalized the input: %s", line)
    return done


def _unique_node_names(model: onnx.ModelProto) -> list[str]:
    """Rename the second and later nodes of each repeated name, per graph; returns the new
    names. Empty names stay empty (onnxruntime names those itself)."""
    graphs = list(iter_graphs(model.graph))
    taken = {n.name for g in graphs for n in g.node}
    renamed = []
    for g in graphs:
        seen: set[str] = set()
        for node in g.node:
            if not node.name:
                continue
            if node.name in seen:
                k = 1
                while f"{node.name}_{k}" in taken:
                    k += 1
                node.name = f"{node.name}_{k}"
                taken.add(node.name)
                renamed.append(node.name)
            seen.add(node.name)
    return renamed


def check_input(model: onnx.ModelProto) -> None:
    """Refuse, with one ``InvalidModelError`` line, an input that fails the checks every
    pass's result gets: truncated initializers (bytes short of their dims), then
    ``onnx.checker`` (on the weight-less copy the manager checks)."""
    from graphopt.runtime.session import check_model

    for g in iter_graphs(model.graph):
        for t in g.initializer:
            _check_filled(t)
    try:
        check_model(model)
    except onnx.checker.ValidationError as exc:
        detail = " ".join(str(exc).split())
        raise InvalidModelError(
            f"the input model is invalid (onnx.checker: {detail}); fix or re-export it") from None


def _check_filled(t: onnx.TensorProto) -> None:
    if not t.HasField("raw_data") or t.data_location == onnx.TensorProto.EXTERNAL:
        return
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        return  # strings, 4-bit types: the checker judges them
    if t.data_type in _SUB_BYTE:
        return
    n = 1
    for d in t.dims:
        n *= d
    have = len(t.raw_data)  # one tensor's bytes at a time
    if have != n * itemsize:
        raise InvalidModelError(
            f"the input model is invalid: initializer '{t.name}' holds {have} bytes, its "
            f"dims {list(t.dims)} and type need {n * itemsize} (a truncated or corrupt "
            "file); re-export or re-download it")


_SUB_BYTE = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1")
             if hasattr(onnx.TensorProto, n)}
