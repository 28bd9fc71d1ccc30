"""Removing whole blocks (layers) found by ``graphopt.analysis.structure``.

``remove_blocks(model, blocks)`` rewires every consumer of a block's exit (nodes and graph
outputs) to the block's entry, following chains of removed neighbours, and deletes what
became dead; region nodes that still feed the rest of the graph (shape-only side products)
stay.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import onnx

from graphopt.analysis.structure import Block, StructureIndex
from graphopt.errors import GraphoptError

logger = logging.getLogger(__name__)


def remove_blocks(model: onnx.ModelProto, blocks: Sequence[Block]) -> int:
    """Remove ``blocks`` (found on this very model) in place; return the nodes deleted.

    Consumers of each exit read the block's entry instead (through removed neighbours);
    a graph output that was an exit becomes an ``Identity`` of the entry.
    """
    bad = [b for b in blocks if not b.removable]
    if bad:
        raise GraphoptError(f"{bad[0].site} cannot be removed: {bad[0].reason}")
    graph = model.graph
    rename = {b.exit: b.entry for b in blocks}

    def resolve(name: str) -> str:
        seen = set()
        while name in rename and name not in seen:
            seen.add(name)
            name = rename[name]
        return name

    doomed = {i for b in blocks for i in b.nodes}
    for node in graph.node:
        _rename_inputs(node, resolve)
    graph_outputs = {o.name for o in graph.output}
    identities = [onnx.helper.make_node("Identity", [resolve(b.exit)], [b.exit],
                                        name=f"graphopt_removed_{b.kind}_{b.index}")
                  for b in blocks if b.exit in graph_outputs]
    # Region nodes that still feed the rest of the graph (shape-only side products) stay.
    idx = StructureIndex(graph)
    needed = graph_outputs - {b.exit for b in blocks}
    needed.update(n for i, ins in enumerate(idx.inputs) if i not in doomed for n in ins)
    needed.update(n for node in identities for n in node.input)
    alive = set()
    for i in sorted(doomed, key=idx.position.__getitem__, reverse=True):
        if set(graph.node[i].output) & needed:
            alive.add(i)
            needed.update(idx.inputs[i])
    keep = [node for i, node in enumerate(graph.node) if i not in doomed or i in alive]
    del graph.node[:]
    graph.node.extend(keep)
    graph.node.extend(identities)
    removed = len(doomed) - len(alive)
    logger.debug("removed %d blocks (%d nodes)", len(blocks), removed)
    return removed


def _rename_inputs(node: onnx.NodeProto, resolve) -> None:
    for k, name in enumerate(node.input):
        if name:
            new = resolve(name)
            if new != name:
                node.input[k] = new
    for attr in node.attribute:
        graphs: Iterable[onnx.GraphProto] = (
            [attr.g] if attr.type == onnx.AttributeProto.GRAPH else
            attr.graphs if attr.type == onnx.AttributeProto.GRAPHS else [])
        for g in graphs:
            for inner in g.node:
                _rename_inputs(inner, resolve)
