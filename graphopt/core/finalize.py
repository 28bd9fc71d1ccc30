"""Cleanup, toposort and shape re-inference: what the manager does after every pass."""

from __future__ import annotations

import onnx

from graphopt.analysis.shapes import infer_shapes, stripped_copy


def finalize(model: onnx.ModelProto, input_shapes=None, *, in_place: bool = False
             ) -> onnx.ModelProto:
    """Cleanup, toposort and re-infer shapes: what the manager does after every pass.

    graphsurgeon works on a weight-less copy (``stripped_copy``) and the cleaned, sorted
    graph it returns is given back to the model, whose initializer messages stay where they
    are: no copy of the weights is made (BERT-base: 1.4 s and +1x model size saved).
    ``in_place=False`` (the default) leaves ``model`` unchanged and returns a new model;
    the manager finalizes in place.
    """
    import onnx_graphsurgeon as gs

    if not in_place:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        model = copy
    graph = gs.import_onnx(stripped_copy(model, initializers_only=True))
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    _adopt_graph(model, gs.export_onnx(graph, do_type_check=False))
    if model.ir_version < 4:
        # graphsurgeon does not list initializers as graph inputs, which IR 3 requires;
        # IR 4 is the same format without that rule.
        model.ir_version = 4
    return infer_shapes(model, None)


def _adopt_graph(model: onnx.ModelProto, cleaned: onnx.ModelProto) -> None:
    """Give ``model`` the nodes, inputs, outputs and initializer set of ``cleaned`` (its
    weight-less, cleaned twin), keeping its own initializer messages and model fields."""
    graph, new = model.graph, cleaned.graph
    keep = {t.name for t in new.initializer}
    for i in reversed(range(len(graph.initializer))):
        if graph.initializer[i].name not in keep:
            del graph.initializer[i]
    have = {t.name for t in graph.initializer}
    graph.initializer.extend(t for t in new.initializer if t.name not in have)
    for name in ("node", "input", "output", "value_info"):
        target = getattr(graph, name)
        del target[:]
        target.extend(getattr(new, name))


def _copy_model_fields(src: onnx.ModelProto, dst: onnx.ModelProto) -> None:
    """graphsurgeon rebuilds the ModelProto; keep what it does not carry."""
    dst.ir_version = src.ir_version
    dst.producer_name = src.producer_name
    dst.producer_version = src.producer_version
    dst.domain = src.domain
    dst.model_version = src.model_version
    dst.doc_string = src.doc_string
    del dst.metadata_props[:]
    dst.metadata_props.extend(src.metadata_props)
    del dst.functions[:]
    dst.functions.extend(src.functions)
    versions = {o.domain: o.version for o in dst.opset_import}
    for opset in src.opset_import:
        if versions.get(opset.domain) != opset.version:
            versions[opset.domain] = opset.version
    del dst.opset_import[:]
    dst.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in versions.items())


# Below this many bytes of weights the manager does not call release_memory (a full gc pass
# costs ~0.1 s in a process with torch loaded; small models' copies do not matter).
