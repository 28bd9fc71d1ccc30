"""``cleanup``: dead code, Identity/Dropout, constant folding, duplicate initializers.

Lossless: outputs stay bit-identical except where folding moves a computation from run time
to save time (the same kernels compute it, so in practice they stay identical too).

1. Identity and inference-mode Dropout nodes are bypassed: their consumers read the input.
   When the node's output is a graph output, the producer's output is renamed to it, so the
   graph's interface keeps its names; when that is impossible (the input is a graph input,
   an initializer or another graph output) the node stays, reported as a skip.
2. Dead nodes (no path to a graph output) and unused initializers are removed. A name read
   only inside an If/Loop/Scan body counts as used: bodies read outer-scope names directly.
3. Constant folding (``fold_constants``): ``Shape``/``Size`` of a statically shaped tensor
   become constants, then onnx-graphsurgeon evaluates, through onnxruntime, every node whose
   inputs are all constant. A folded tensor larger than ``max_fold_bytes`` is refused (a
   ``Tile`` or ``Expand`` of a constant would bloat the file). Never folded: random ops,
   quantization ops (folding would store dequantized weights), nodes with subgraphs, nodes
   reading an initializer that is also a graph input (the user may override it), and nodes
   producing a graph output.
4. Initializers with the same dtype, shape and bytes are merged into one
   (``deduplicate_initializers``).
5. Subgraphs are not optimized; renames reach into them where they read an outer name.

The module also holds the small graph-editing helpers the other lossless passes share
(``GraphIndex``, ``rename_inputs``, ``remove_passthrough``, ``prune_orphans``,
``shape_skeleton``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from graphopt.errors import ConfigError
from graphopt.pass_manager import Context, Pass, PassResult, Skip, register

logger = logging.getLogger(__name__)

ONNX_DOMAINS = ("", "ai.onnx")
# Domains onnxruntime evaluates out of the box; other custom ops are never folded.
_FOLDABLE_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft")
_RANDOM_OPS = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
               "Multinomial", "Bernoulli"}
_QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}


# --------------------------------------------------------------------------- graph helpers


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
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for name in node_reads(node):
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
            return _constant_node_value(self.constant_nodes[name])
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


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    """A ``Constant`` node's value with the dtype the op gives it (sparse/string: None)."""
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


# --------------------------------------------------------------------------- the pass


@dataclass(frozen=True)
class CleanupConfig:
    fold_constants: bool = True
    # The largest tensor a fold may create; 1 MiB keeps a Tile/Expand of a constant at run time.
    max_fold_bytes: int = 1 << 20
    deduplicate_initializers: bool = True

    def __post_init__(self):
        if self.max_fold_bytes < 0:
            raise ConfigError(f"max_fold_bytes must be >= 0, got {self.max_fold_bytes}")


@register
class Cleanup(Pass):
    """Remove dead code, Identity/Dropout, fold constants, merge duplicate initializers.

    See the module docstring for the numbered cases.
    """

    name = "cleanup"
    Config = CleanupConfig
    lossless = True

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        counters = {"identities_removed": 0, "dropouts_removed": 0, "nodes_removed": 0,
                    "constants_folded": 0, "initializers_deduplicated": 0,
                    "initializers_removed": 0}
        skipped: list[Skip] = []
        graph = model.graph
        with ir3_inputs_kept(model):
            _remove_identities(graph, model.ir_version, counters, skipped)
            counters["nodes_removed"] += _remove_dead_nodes(graph)
            if self.config.fold_constants:
                _fold(model, self.config.max_fold_bytes, counters, skipped)
            counters["nodes_removed"] += _remove_dead_nodes(graph)
            overridable = GraphIndex(graph, model.ir_version).overridable
            counters["initializers_removed"] = _remove_unused_initializers(graph, overridable)
            if self.config.deduplicate_initializers:
                counters["initializers_deduplicated"] = _deduplicate(graph, overridable)
        modified = any(counters.values())
        return PassResult(model, modified, counters, skipped)


# --------------------------------------------------------------------------- identities


def _dropout_blocker(idx: GraphIndex, node: onnx.NodeProto) -> str | None:
    if attr(node, "is_test", 1) == 0:
        return "is_test=0 (training mode)"
    if len(node.input) > 2 and node.input[2]:
        mode = idx.value(node.input[2])
        if mode is None:
            return f"training_mode input '{node.input[2]}' {idx.not_constant(node.input[2])}"
        if bool(np.asarray(mode).any()):
            return "training_mode is true"
    if len(node.output) > 1 and node.output[1] and idx.uses(node.output[1]):
        return f"its mask output '{node.output[1]}' is used"
    return None


def _remove_identities(graph: onnx.GraphProto, ir_version: int, counters: dict,
                       skipped: list[Skip]) -> None:
    idx = GraphIndex(graph, ir_version)
    candidates = []
    for node in graph.node:
        if node.domain not in ONNX_DOMAINS or node.op_type not in ("Identity", "Dropout"):
            continue
        if node.op_type == "Dropout":
            reason = _dropout_blocker(idx, node)
            if reason:
                skipped.append(Skip(site(node), f"Dropout kept: {reason}"))
                continue
        candidates.append(node)
    removed, kept = remove_passthrough(graph, candidates)
    for node in removed:
        counters["identities_removed" if node.op_type == "Identity" else "dropouts_removed"] += 1
    skipped.extend(Skip(site(n), f"{n.op_type} kept: {reason}") for n, reason in kept)


# --------------------------------------------------------------------------- dead code


def _remove_dead_nodes(graph: onnx.GraphProto) -> int:
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


def _remove_unused_initializers(graph: onnx.GraphProto, overridable: set[str]) -> int:
    used = {o.name for o in graph.output} | overridable
    for node in graph.node:
        used |= node_reads(node)
    return drop_initializers(graph, [t.name for t in graph.initializer if t.name not in used])


# --------------------------------------------------------------------------- duplicates


def _deduplicate(graph: onnx.GraphProto, protected: set[str]) -> int:
    """Merge initializers equal in dtype, shape and bytes; returns how many were dropped."""
    outputs = {o.name for o in graph.output}
    groups: dict[tuple, list[onnx.TensorProto]] = defaultdict(list)
    for t in graph.initializer:
        if (t.name in protected or t.data_type == onnx.TensorProto.STRING
                or t.data_location == onnx.TensorProto.EXTERNAL):
            continue
        groups[(t.data_type, tuple(t.dims))].append(t)
    mapping: dict[str, str] = {}
    for members in groups.values():
        if len(members) < 2:
            continue
        # Bucket by a sample of the bytes, then compare whole tensors only within a bucket:
        # hashing every weight costs more than the rest of the pass.
        buckets: dict[bytes, list[onnx.TensorProto]] = defaultdict(list)
        for t in members:
            raw = _tensor_bytes(t)
            buckets[hashlib.sha1(raw[:_SAMPLE] + raw[-_SAMPLE:]).digest()].append(t)
        for bucket in buckets.values():
            # A graph output keeps its name, so it is the one the others merge into.
            bucket.sort(key=lambda t: t.name not in outputs)
            kept: list[onnx.TensorProto] = []
            for t in bucket:
                raw = _tensor_bytes(t)
                same = next((k for k in kept if _tensor_bytes(k) == raw), None)
                if same is None or t.name in outputs:
                    kept.append(t)
                else:
                    mapping[t.name] = same.name
    if not mapping:
        return 0
    for node in graph.node:
        rename_inputs(node, mapping)
    drop_initializers(graph, mapping)
    drop_value_info(graph, mapping)
    return len(mapping)


_SAMPLE = 1 << 16


def _tensor_bytes(t: onnx.TensorProto) -> bytes:
    if t.HasField("raw_data"):
        return t.raw_data
    return np.ascontiguousarray(numpy_helper.to_array(t)).tobytes()


# --------------------------------------------------------------------------- folding


def _fold_blocker(op_type: str, domain: str, outputs: Iterable[str], has_subgraph: bool,
                  idx: GraphIndex) -> str | None:
    """Why a node whose inputs are all constant must not be folded, or None."""
    if domain not in _FOLDABLE_DOMAINS:
        return f"custom domain '{domain}' that onnxruntime may not evaluate"
    if op_type in _RANDOM_OPS:
        return f"{op_type} is random; folding would freeze one sample"
    if op_type in _QUANT_OPS:
        return f"{op_type} kept so quantized weights stay quantized"
    if has_subgraph:
        return "it has a subgraph (folding does not look inside subgraphs)"
    if any(o in idx.graph_outputs for o in outputs):
        return "it produces a graph output, which stays computed rather than stored"
    return None


def _fold_candidates(idx: GraphIndex, skipped: list[Skip] | None) -> list[onnx.NodeProto]:
    """Nodes computable from constants alone, in graph order."""
    const = {n for n in idx.initializers if idx.is_initializer(n)} | set(idx.constant_nodes)
    candidates = []
    for node in idx.graph.node:
        if node.op_type == "Constant" and node.domain in ONNX_DOMAINS:
            continue
        if not node.input and node.op_type not in _RANDOM_OPS:
            continue  # a custom source op: nothing to fold it from
        if not all(i in const for i in node_reads(node)):
            continue
        has_subgraph = any(True for _ in subgraphs(node))
        reason = _fold_blocker(node.op_type, node.domain, node.output, has_subgraph, idx)
        if reason:
            # A node already reported (an Identity kept for its names) is not reported twice.
            if skipped is not None and all(s.site != site(node) for s in skipped):
                skipped.append(Skip(site(node), f"not folded: {reason}"))
            continue
        candidates.append(node)
        const.update(o for o in node.output if o)
    return candidates


def _fold_shapes(model: onnx.ModelProto) -> None:
    """Replace Shape/Size of statically shaped tensors with initializers."""
    from graphopt.analysis.shapes import infer_shapes

    graph = model.graph
    idx = GraphIndex(graph, model.ir_version)
    wanted = [n for n in graph.node if n.domain in ONNX_DOMAINS and n.op_type in ("Shape", "Size")
              and not idx.is_constant(n.input[0]) and n.output[0] not in idx.graph_outputs]
    if not wanted:
        return
    work = infer_shapes(shape_skeleton(model), symbolic=False)
    dims: dict[str, list[int] | None] = {}
    for vi in list(work.graph.input) + list(work.graph.value_info) + list(work.graph.output):
        tt = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and tt.HasField("shape"):
            static = all(d.HasField("dim_value") for d in tt.shape.dim)
            dims[vi.name] = [d.dim_value for d in tt.shape.dim] if static else None
    for t in graph.initializer:
        dims[t.name] = list(t.dims)
    folded = []
    for node in wanted:
        shape = dims.get(node.input[0])
        if shape is None:
            continue
        if node.op_type == "Shape":
            start, end = attr(node, "start", 0), attr(node, "end", len(shape))
            value = np.array(shape[start:end], dtype=np.int64)
        else:
            value = np.array(int(np.prod(shape, dtype=np.int64)), dtype=np.int64)
        graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
        folded.append(node)
    remove_nodes(graph, folded)


@contextlib.contextmanager
def _quiet_graphsurgeon():
    from onnx_graphsurgeon.logger import G_LOGGER

    old = G_LOGGER.severity
    G_LOGGER.severity = G_LOGGER.CRITICAL
    try:
        yield
    finally:
        G_LOGGER.severity = old


def _computed_nodes(graph: onnx.GraphProto) -> int:
    return sum(1 for n in graph.node if not (n.op_type == "Constant" and n.domain in ONNX_DOMAINS))


def _fold(model: onnx.ModelProto, max_bytes: int, counters: dict, skipped: list[Skip]) -> None:
    graph = model.graph
    before = _computed_nodes(graph)
    _fold_shapes(model)
    idx = GraphIndex(graph, model.ir_version)
    candidates = _fold_candidates(idx, skipped)
    if candidates:
        try:
            values = _evaluate(model, idx)
        except Exception as exc:  # noqa: BLE001 - a folder failure must not cost the rest
            logger.warning("constant folding failed: %s", exc)
            skipped.append(Skip("graph", (
                f"constant folding failed in onnx-graphsurgeon ({exc.__class__.__name__}: "
                f"{exc}); the other cleanups still ran (run with fold_constants=false to "
                "skip folding)")))
        else:
            refused = _apply_values(graph, idx, candidates, values, max_bytes)
            _remove_dead_nodes(graph)
            _report_unfolded(model, refused, skipped)
    _remove_dead_nodes(graph)
    counters["constants_folded"] = before - _computed_nodes(graph)


def _evaluate(model: onnx.ModelProto, idx: GraphIndex) -> dict[str, np.ndarray]:
    """Values onnx-graphsurgeon's folder computes (through onnxruntime) for node outputs.

    The folding runs on graphsurgeon's copy of the graph and only the values come back, so
    the proto keeps its Constant nodes, subgraphs and metadata as they were.
    """
    import onnx_graphsurgeon as gs

    def exclude(node) -> bool:
        if any(t.name in idx.overridable for t in node.inputs):
            return True
        outputs = [t.name for t in node.outputs]
        has_subgraph = any(True for _ in node.subgraphs())
        return _fold_blocker(node.op, node.domain or "", outputs, has_subgraph, idx) is not None

    computed = {o for n in model.graph.node
                if not (n.op_type == "Constant" and n.domain in ONNX_DOMAINS)
                for o in n.output if o}
    values: dict[str, np.ndarray] = {}
    # One onnxruntime session first; if it fails, graphsurgeon's recursive partitioning, where a
    # node onnxruntime cannot run spoils only its own part (but which evaluates only the
    # ends of constant chains, so it folds less).
    for partitioning in (None, "recursive"):
        with _quiet_graphsurgeon():
            g = gs.import_onnx(model)
            g.toposort()
            g.fold_constants(fold_shapes=False, recurse_subgraphs=False,
                             partitioning=partitioning, error_ok=True, flatten_subgraphs=False,
                             size_threshold=None, should_exclude_node=exclude,
                             recurse_functions=False)
        for name, tensor in g.tensors().items():
            if name in computed and isinstance(tensor, gs.Constant):
                value = tensor.values
                if isinstance(value, np.ndarray):
                    values[name] = value
        if values:
            break
    return values


def _apply_values(graph: onnx.GraphProto, idx: GraphIndex, candidates, values, max_bytes: int
                  ) -> dict[str, str]:
    """Store folded values as initializers; returns the sites refused for their size, with
    the reason (reported only if the node is still needed once the others are folded)."""
    refused: dict[str, str] = {}
    folded: list[onnx.NodeProto] = []
    for node in candidates:
        outs = [o for o in node.output if o in values]
        if not outs:
            continue
        big = [o for o in outs if values[o].nbytes > max_bytes]
        if big:
            refused[site(node)] = (
                f"not folded: result '{big[0]}' would be {values[big[0]].nbytes} bytes, over "
                f"max_fold_bytes={max_bytes} (raise it to fold anyway)")
            continue
        needed = [o for o in node.output if o and idx.uses(o)]
        if all(o in values for o in needed):
            # Every used output is known: the node goes and its outputs keep their names.
            # (Otherwise the node stays whole; only graphsurgeon's partitioned fallback
            # returns some outputs of a node without the others.)
            folded.append(node)
            for o in needed:
                graph.initializer.append(numpy_helper.from_array(values[o], o))
    remove_nodes(graph, folded)
    return refused


def _report_unfolded(model: onnx.ModelProto, refused: dict[str, str], skipped: list[Skip]
                     ) -> None:
    idx = GraphIndex(model.graph, model.ir_version)
    blocked = set(refused)
    found: list[Skip] = []
    for node in reversed(_fold_candidates(idx, None)):
        if site(node) in refused:
            found.append(Skip(site(node), refused[site(node)]))
            continue
        feeds = [site(c) for o in node.output for c in idx.consumers.get(o, ())
                 if site(c) in blocked]
        if feeds:
            blocked.add(site(node))
            found.append(Skip(site(node), (
                f"not folded: feeds '{feeds[0]}', whose result is over max_fold_bytes")))
        else:
            found.append(Skip(site(node), "not folded: onnxruntime could not evaluate it"))
    skipped.extend(reversed(found))
