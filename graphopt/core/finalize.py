"""Cleanup, toposort and shape re-inference: what the manager does after every pass."""

from __future__ import annotations

import onnx

from graphopt.analysis.shapes import infer_shapes
from graphopt.ir.tidy import tidy


def finalize(model: onnx.ModelProto, input_shapes=None, *, in_place: bool = False
             ) -> onnx.ModelProto:
    """Cleanup, toposort and re-infer shapes: what the manager does after every pass.

    Dead nodes and unused initializers go and nodes are sorted on the protos themselves
    (``graphopt.ir.tidy``: nodes, subgraphs and graph inputs are kept as they are; see
    there why not through onnx-graphsurgeon), so no copy of the weights is made.
    ``in_place=False`` (the default) leaves ``model`` unchanged and returns a new model;
    the manager finalizes in place.
    """
    if not in_place:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        model = copy
    tidy(model)
    return infer_shapes(model, None)


# Below this many bytes of weights the manager does not call release_memory (a full gc pass
# costs ~0.1 s in a process with torch loaded; small models' copies do not matter).
