"""What ``graphopt inspect`` reports about a model, as plain data."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx

from graphopt.analysis.cost import count_cost
from graphopt.ir.inputs import check_input_shapes, input_specs
from graphopt.ir.model import iter_graphs, load, open_for_run, stored_bytes


def _dims(vi: onnx.ValueInfoProto) -> list[Any]:
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]


def _dtype(vi: onnx.ValueInfoProto) -> str:
    elem = vi.type.tensor_type.elem_type
    if not elem:
        return "?"
    try:
        return str(onnx.helper.tensor_dtype_to_np_dtype(elem))
    except (KeyError, TypeError):
        return onnx.TensorProto.DataType.Name(elem).lower()


def _formula(model, input_shapes, cost) -> dict[str, Any]:
    """``macs_formula`` when the MACs were counted at assumed dims (see ``cost_dims``)."""
    if not cost.assumed:
        return {}
    from graphopt.analysis.cost_dims import macs_formula

    formula = macs_formula(model, input_shapes)
    return {"macs_formula": formula.to_dict()} if formula is not None else {}


def inspect_model(source: str | Path | onnx.ModelProto,
                  input_shapes: Mapping[str, tuple[int, ...]] | None = None,
                  *, groups: bool = False) -> dict[str, Any]:
    # Without --groups, a file over 2 GB is read as its outline (the big tensors stay on
    # disk): costs need dims, not values.
    model = load(source) if groups or isinstance(source, onnx.ModelProto) else \
        open_for_run(source).model
    check_input_shapes(model, input_shapes or {})
    cost = count_cost(model, input_shapes)
    ops: Counter[str] = Counter()
    for graph in iter_graphs(model.graph):
        for node in graph.node:
            ops[f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx")
                else node.op_type] += 1
    info: dict[str, Any] = {
        "path": str(source) if not isinstance(source, onnx.ModelProto) else None,
        "ir_version": model.ir_version,
        "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "inputs": [{"name": s.name, "dtype": str(s.dtype),
                    "shape": ["?" if d is None else d for d in s.dims]} for s in input_specs(model)],
        "outputs": [{"name": o.name, "dtype": _dtype(o), "shape": _dims(o)}
                    for o in model.graph.output],
        "nodes": sum(ops.values()),
        "subgraphs": sum(1 for _ in iter_graphs(model.graph)) - 1,
        "op_histogram": dict(ops.most_common()),
        "cost": {**cost.to_dict(), **_formula(model, input_shapes, cost)},
        "weight_bytes": stored_bytes(model),
        "metadata": {p.key: p.value for p in model.metadata_props},
    }
    if not isinstance(source, onnx.ModelProto):
        info["file_bytes"] = Path(source).stat().st_size
    if groups:
        from graphopt.analysis.coupling import coupled_groups

        info["groups"] = [g.to_dict() for g in coupled_groups(model, input_shapes)]
    return info

