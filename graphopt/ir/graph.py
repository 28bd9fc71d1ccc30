"""Small graph-editing helpers shared by the passes that edit ``onnx`` protos directly.

``GraphIndex`` (producers and consumers by name), renaming inputs (into subgraphs too),
bypassing pass-through nodes (``remove_passthrough``), dropping orphaned initializers
(``prune_orphans``) and a weight-less copy for shape inference (``shape_skeleton``).
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

logger = logging.getLogger(__name__)

ONNX_DOMAINS = ("", "ai.onnx")


def site(node: onnx.NodeProto) -> str:
    """How a report names a node: its name, else ``op_type:first_output``."""
    if node.name:
        return node.name
    return f"{node.op_type}:{node.output[0] if node.output else '?'}"


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _defined_in(graph: onnx.GraphProto) -> set[str]:
    names = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    names.update(t.values.name for t in graph.sparse_initializer)
    for node in graph.node:
        names.update(o for o in node.output if o)
    return names


def _outer_refs(graph: onnx.GraphProto, outer_defined: set[str]) -> set[str]:
    defined = outer_defined | _defined_in(graph)
    refs = set()
    for node in graph.node:
        refs.update(i for i in node.input if i and i not in defined)
        for sub in subgraphs(node):
            refs.update(r for r in _outer_refs(sub, defined) if r not in defined)
    refs.update(o.name for o in graph.output if o.name not in defined)
    return refs


def subgraph_refs(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs read from the enclosing scope (its hidden inputs)."""
    refs: set[str] = set()
    for sub in subgraphs(node):
        refs |= _outer_refs(sub, set())
    return refs


def node_reads(node: onnx.NodeProto) -> set[str]:
    """Every name a node reads: its inputs and its subgraphs' outer-scope references."""
    return {i for i in node.input if i} | subgraph_refs(node)


class GraphIndex:
    """Producers, consumers and constants of one (top-level) graph, built once.

    Rebuild it after an edit; passes decide everything on one index, then rewrite.
    An initializer that is also a graph input is a default the caller may override, so it
    is not a constant, except under IR version < 4, where the format lists every
    initializer as an input (give ``ir_version`` to apply that rule).
    """

    def __init__(self, graph: onnx.GraphProto, ir_version: int | None = None):
        self.graph = graph
        self.nodes: list[onnx.NodeProto] = list(graph.node)
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        # The same by position: the producing node's index, and every (node index, input
        # slot) that reads a name, slot -1 for a read by the node's subgraphs.
        self.position: dict[str, int] = {}
        self.slots: dict[str, list[tuple[int, int]]] = {}
        self.reads: list[list[str]] = []  # per node: its inputs, then its subgraphs' reads
        for idx, node in enumerate(self.nodes):
            for out in node.output:
                if out:
                    self.producer[out] = node
                    self.position[out] = idx
            hidden = sorted(subgraph_refs(node))
            for slot, name in enumerate(node.input):
                if name:
                    self.slots.setdefault(name, []).append((idx, slot))
            for name in hidden:
                self.slots.setdefault(name, []).append((idx, -1))
            self.reads.append([n for n in node.input if n] + hidden)
            for name in dict.fromkeys(self.reads[-1]):
                self.consumers[name].append(node)
        self.graph_inputs = {i.name for i in graph.input}
        self.graph_outputs = {o.name for o in graph.output}
        self.initializers = {t.name: t for t in graph.initializer}
        forced = ir_version is not None and ir_version < 4
        self.overridable = set() if forced else self.graph_inputs & set(self.initializers)
        self.constant_nodes = {
            n.output[0]: n for n in graph.node
            if n.op_type == "Constant" and n.domain in ONNX_DOMAINS and n.output
        }

    def reader_positions(self, name: str) -> list[int]:
        """Indices of the nodes reading ``name`` (each once), in graph order."""
        return list(dict.fromkeys(idx for idx, _ in self.slots.get(name, ())))

    def topological_order(self) -> list[int]:
        """Node indices in an order where every node comes after its producers (Kahn,
        stable: ties keep graph order); nodes on a cycle are left out."""
        pending = [len({n for n in ins if n in self.position}) for ins in self.reads]
        ready = deque(i for i, p in enumerate(pending) if p == 0)
        order = []
        while ready:
            i = ready.popleft()
            order.append(i)
            for out in self.nodes[i].output:
                for c in self.reader_positions(out) if out else ():
                    pending[c] -= 1
                    if pending[c] == 0:
                        ready.append(c)
        return order

    def is_initializer(self, name: str) -> bool:
        """An initializer the caller cannot override."""
        return name in self.initializers and name not in self.overridable

    def not_constant(self, name: str) -> str:
        """How a reason says why ``name`` is not a constant."""
        if name in self.overridable:
            return "is an initializer listed as a graph input, which callers may override"
        return "is not a constant"

    def is_constant(self, name: str) -> bool:
        return self.is_initializer(name) or name in self.constant_nodes

    def value(self, name: str) -> np.ndarray | None:
        """The constant value of ``name`` (initializer or ``Constant`` node), else None."""
        if self.is_initializer(name):
            return numpy_helper.to_array(self.initializers[name])
        if name in self.constant_nodes:
            return constant_node_value(self.constant_nodes[name])
        return None

    def uses(self, name: str) -> int:
        """Nodes reading ``name``, plus one if it is a graph output."""
        return len(self.consumers.get(name, ())) + (name in self.graph_outputs)

    def all_names(self) -> set[str]:
        names = set()
        stack = [self.graph]
        while stack:
            g = stack.pop()
            names |= _defined_in(g)
            for node in g.node:
                names.update(node.input)
                stack.extend(subgraphs(node))
        return names


_CONSTANT_DTYPES = {"value_float": np.float32, "value_floats": np.float32,
                   "value_int": np.int64, "value_ints": np.int64}


def constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    """A ``Constant`` node's value with the dtype the op gives it: ``value_float(s)`` are
    float32 and ``value_int(s)`` int64, as the ONNX spec types them (sparse/string: None).
    The one constant-value reader: ``ir.model.constant_value`` and ``analysis.view`` use it."""
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name in _CONSTANT_DTYPES:
            return np.array(onnx.helper.get_attribute_value(a), dtype=_CONSTANT_DTYPES[a.name])
    return None


def unique_name(base: str, taken: set[str]) -> str:
    """``base`` or ``base_1``, ``base_2``...: the first not in ``taken`` (which it joins)."""
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            value = onnx.helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))


def _rename_in_subgraph(graph: onnx.GraphProto, mapping: Mapping[str, str]) -> None:
    # A body that defines a name itself shadows the outer one (SSA forbids it, but be safe).
    local = _defined_in(graph)
    mapping = {k: v for k, v in mapping.items() if k not in local}
    if not mapping:
        return
    for node in graph.node:
        rename_inputs(node, mapping)
    for out in graph.output:
        if out.name in mapping:
            out.name = mapping[out.name]
    for vi in graph.value_info:
        if vi.name in mapping:
            vi.name = mapping[vi.name]


def rename_inputs(node: onnx.NodeProto, mapping: Mapping[str, str]) -> None:
    """Point ``node``'s inputs, and its subgraphs' outer references, through ``mapping``."""
    for i, name in enumerate(node.input):
        if name in mapping:
            node.input[i] = mapping[name]
    for sub in subgraphs(node):
        _rename_in_subgraph(sub, mapping)


def drop_value_info(graph: onnx.GraphProto, names: Iterable[str]) -> None:
    names = set(names)
    keep = [vi for vi in graph.value_info if vi.name not in names]
    if len(keep) != len(graph.value_info):
        del graph.value_info[:]
        graph.value_info.extend(keep)


def remove_nodes(graph: onnx.GraphProto, nodes: Iterable[onnx.NodeProto]) -> None:
    """Drop ``nodes`` (live nodes of ``graph``). References to the graph's nodes held
    elsewhere are stale afterwards: do every edit first, remove once at the end."""
    replace_nodes(graph, {id(n): [] for n in nodes})


def replace_nodes(graph: onnx.GraphProto, replacements: Mapping[int, list[onnx.NodeProto]]
                  ) -> None:
    """Put ``replacements[id(node)]`` (possibly empty) in place of each such live node."""
    if not replacements:
        return
    new = []
    for node in graph.node:
        new.extend(replacements.get(id(node), (node,)))
    del graph.node[:]
    graph.node.extend(new)


def _passthrough_blocker(idx: GraphIndex, src: str, dst: str) -> str | None:
    if dst not in idx.graph_outputs:
        return None
    if src in idx.graph_outputs:
        return f"both '{src}' and '{dst}' are graph outputs; kept so both names stay"
    if src not in idx.producer:
        kind = "graph input" if src in idx.graph_inputs else "initializer"
        return f"{kind} '{src}' passes straight to graph output '{dst}'; kept so both names stay"
    return None


def remove_passthrough(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]
                       ) -> tuple[list[onnx.NodeProto], list[tuple[onnx.NodeProto, str]]]:
    """Remove nodes whose first output equals their first input (Identity, a no-op Pad).

    ``nodes`` are live nodes of ``graph`` in graph order. Readers of a removed output read the
    input instead; when the output is a graph output, the input is renamed to it (at its
    producer and every reader), so the graph keeps its output names. A node that cannot go
    (its input is a graph input, an initializer or another graph output) stays. Returns the
    removed nodes (detached copies) and the kept ones with the reason.
    """
    idx = GraphIndex(graph)
    alias: dict[str, str] = {}      # removed output -> the name its readers read instead
    renamed: dict[str, str] = {}    # producer output -> graph output name it takes over
    removed: list[onnx.NodeProto] = []
    kept: list[tuple[onnx.NodeProto, str]] = []

    def resolve(name: str) -> str:
        while name in alias:
            name = alias[name]
        return name

    for node in nodes:
        src, dst = resolve(node.input[0]), node.output[0]
        if dst not in idx.graph_outputs:
            alias[dst] = src
        else:
            reason = _passthrough_blocker(idx, src, dst)
            if reason is None and src in renamed:
                reason = f"'{src}' already became graph output '{renamed[src]}'; kept"
            if reason:
                kept.append((node, reason))
                continue
            renamed[src] = dst
        removed.append(node)
    if not removed:
        return [], kept
    mapping = {}
    for name in list(alias) + list(renamed):
        target = resolve(name)
        mapping[name] = renamed.get(target, target)
    gone = [_detached(n) for n in removed]
    kept = [(_detached(n), r) for n, r in kept]
    remove_nodes(graph, removed)
    for node in graph.node:
        rename_inputs(node, mapping)
        for i, out in enumerate(node.output):
            if out in renamed:
                node.output[i] = renamed[out]
    drop_value_info(graph, mapping)
    return gone, kept


def _detached(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy


def drop_initializers(graph: onnx.GraphProto, names: Iterable[str]) -> int:
    """Delete the named initializers in place (no copy of the others' bytes)."""
    names = set(names)
    doomed = [i for i, t in enumerate(graph.initializer) if t.name in names]
    for i in reversed(doomed):
        del graph.initializer[i]
    return len(doomed)


def shape_skeleton(model: onnx.ModelProto, keep_elements: int = 1024) -> onnx.ModelProto:
    """A copy of ``model`` for shape inference: large initializers become typed graph
    inputs, so neither their bytes are copied nor the originals touched. Small ones (shape
    constants that inference reads) are kept."""
    work = onnx.ModelProto()
    graph = model.graph
    for field in ("ir_version", "producer_name", "domain"):
        setattr(work, field, getattr(model, field))
    work.opset_import.extend(model.opset_import)
    work.functions.extend(model.functions)
    g = work.graph
    g.name = graph.name
    g.node.extend(graph.node)
    g.input.extend(graph.input)
    g.output.extend(graph.output)
    declared = {i.name for i in graph.input}
    for t in graph.initializer:
        small = int(np.prod(t.dims, dtype=np.int64)) <= keep_elements
        if small and t.data_location != onnx.TensorProto.EXTERNAL:
            g.initializer.append(t)
        elif t.name not in declared:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims))
    return work


@contextlib.contextmanager
def ir3_inputs_kept(model: onnx.ModelProto) -> Iterator[None]:
    """IR version < 4 lists every initializer among the graph inputs: an edit that adds,
    removes or reshapes initializers re-establishes that on the way out."""
    if model.ir_version >= 4:
        yield
        return
    graph = model.graph
    before = {t.name for t in graph.initializer} & {i.name for i in graph.input}
    yield
    inits = {t.name: t for t in graph.initializer}
    inputs = []
    for vi in graph.input:
        if vi.name in inits:
            t = inits[vi.name]
            vi = onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims)
        elif vi.name in before:
            continue  # its initializer is gone
        inputs.append(vi)
    listed = {vi.name for vi in inputs}
    inputs += [onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims)
               for t in graph.initializer if t.name not in listed]
    del graph.input[:]
    graph.input.extend(inputs)


def prune_orphans(graph: onnx.GraphProto, names: Iterable[str], ir_version: int | None = None
                  ) -> int:
    """Remove the initializers and producers of ``names`` that nothing reads any more,
    and so on upstream (graph inputs stay). Returns the number of nodes removed."""
    idx = GraphIndex(graph, ir_version)
    dead_nodes: list[onnx.NodeProto] = []
    dead_inits: set[str] = set()
    gone: set[int] = set()
    reads: dict[str, int] = {n: len(c) for n, c in idx.consumers.items()}
    stack = [n for n in names if n]
    while stack:
        name = stack.pop()
        if reads.get(name, 0) > 0 or name in idx.graph_outputs or name in idx.overridable:
            continue
        if name in idx.initializers:
            dead_inits.add(name)
            continue
        producer = idx.producer.get(name)
        if producer is None or id(producer) in gone or name in idx.graph_inputs:
            continue
        if any(reads.get(o, 0) > 0 or o in idx.graph_outputs for o in producer.output if o):
            continue
        gone.add(id(producer))
        dead_nodes.append(producer)
        for read in node_reads(producer):
            reads[read] = reads.get(read, 0) - 1
            stack.append(read)
    if dead_nodes:
        remove_nodes(graph, dead_nodes)
    drop_initializers(graph, dead_inits)
    return len(dead_nodes)
