"""Dead-code removal and topological order for the top-level graph, edited in place.

What the manager's ``finalize`` does after every pass, written on the protos instead of
through onnx-graphsurgeon (whose import/export it replaces there), because graphsurgeon
0.6.1

1. sorts without the names an If/Loop/Scan body reads from the enclosing scope, so a
   producer read only inside a branch may land after the If (the checker then refuses
   "Nodes in a graph must be topologically sorted");
2. recurses without end in ``get_used_funcs`` on a model-local function next to an If;
3. exports no initializer as a graph input, so an initializer the caller may override (also
   listed as a graph input) stopped being an input;
4. rebuilds every node and subgraph, re-encoding tensors held inside branches.

Here nodes are kept as they are (subgraphs byte for byte), graph inputs and outputs are
never touched, and the order is stable: a node moves only when it reads a name produced
after it.
"""

from __future__ import annotations

import heapq

import onnx

from graphopt.errors import GraphoptError
from graphopt.ir.graph import GraphIndex, drop_initializers, node_reads, remove_nodes


class GraphCycleError(GraphoptError):
    """The graph's nodes read each other in a cycle."""


def remove_dead_nodes(graph: onnx.GraphProto) -> int:
    """Drop nodes with no path to a graph output (reads inside subgraphs count); returns
    how many went."""
    idx = GraphIndex(graph)
    live: set[int] = set()
    seen: set[str] = set()
    stack = list(idx.graph_outputs)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        producer = idx.producer.get(name)
        if producer is None or id(producer) in live:
            continue
        live.add(id(producer))
        stack.extend(node_reads(producer))
    dead = [n for n in graph.node if id(n) not in live]
    if dead:
        remove_nodes(graph, dead)
    return len(dead)


def remove_unused_initializers(graph: onnx.GraphProto, ir_version: int) -> int:
    """Drop initializers nothing reads. One also listed as a graph input stays (a default the
    caller may feed), except under IR < 4, where every initializer is listed and an unread
    one leaves the inputs with its initializer."""
    used = {o.name for o in graph.output}
    for node in graph.node:
        used |= node_reads(node)
    inputs = {i.name for i in graph.input}
    doomed = [t.name for t in graph.initializer
              if t.name not in used and (t.name not in inputs or ir_version < 4)]
    if not doomed:
        return 0
    drop_initializers(graph, doomed)
    if ir_version < 4:
        gone = set(doomed)
        keep = [i for i in graph.input if i.name not in gone]
        del graph.input[:]
        graph.input.extend(keep)
    return len(doomed)


def toposort(graph: onnx.GraphProto) -> bool:
    """Order ``graph``'s nodes so each comes after the producers of every name it reads
    (its subgraphs' outer-scope reads included); stable. Returns whether the order changed.
    Raises ``GraphCycleError`` naming a node on a cycle."""
    nodes = list(graph.node)
    producer: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for out in node.output:
            if out:
                producer.setdefault(out, i)
    waiting = [0] * len(nodes)
    readers: list[list[int]] = [[] for _ in nodes]
    for i, node in enumerate(nodes):
        deps = {producer[n] for n in node_reads(node) if n in producer and producer[n] != i}
        waiting[i] = len(deps)
        for d in deps:
            readers[d].append(i)
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for r in readers[i]:
            waiting[r] -= 1
            if waiting[r] == 0:
                heapq.heappush(ready, r)
    if len(order) != len(nodes):
        stuck = next(nodes[i] for i, w in enumerate(waiting) if w > 0)
        label = stuck.name or f"{stuck.op_type} -> {stuck.output[0] if stuck.output else '?'}"
        raise GraphCycleError(f"the graph has a cycle through node '{label}': its inputs "
                              "depend on its own outputs")
    if order == list(range(len(nodes))):
        return False
    sorted_nodes = [nodes[i] for i in order]
    del graph.node[:]
    graph.node.extend(sorted_nodes)
    return True


def tidy(model: onnx.ModelProto) -> None:
    """Dead nodes and unused initializers out, nodes in topological order, in place."""
    graph = model.graph
    remove_dead_nodes(graph)
    remove_unused_initializers(graph, model.ir_version)
    toposort(graph)
