"""Capturing tensors of a model feed by feed, running only what earlier captures did not.

A Gram capture (``graphopt.data.gram.accumulate``) reads a few tensors of a model on every
calibration feed; the sequential refit reads the inputs of the layers it refits one depth
after the other, and the pruning scores read the consumers' inputs in chunks. Running each
capture from the graph inputs would run the early layers once per capture (BERT-base, a
refit of 13 levels: ~7 forward passes instead of one). ``Segments`` keeps, per feed, the
tensors a later capture will need:

1. ``run(model, names)`` yields, feed by feed, ``{name: array}`` for ``names``. Its
   session runs the *segment*: the nodes the names need, walking back from them and
   stopping at the graph inputs and at tensors an earlier call kept (which become the
   segment's inputs). It also returns the segment's *frontier*, the tensors it made (or
   had kept) that nodes not yet run still read, and keeps them for the next call.
2. ``invalidate(model, names)``: the caller changed the nodes making ``names`` (a refit
   rewrote their weights): those nodes and everything downstream of them count as not
   run, and kept tensors downstream are dropped. ``run``'s ``hold`` names tensors the
   call makes or has kept that the caller wants kept for the next call even when no node
   left to run reads them (while they fit ``max_bytes``): a sequential refit holds its
   sites' activation inputs, rewrites the sites' weights, and the next call runs the
   sites again from them instead of from the last kept tensors before them (the FFN input
   layer before each refit FFN output layer of BERT-base would run twice). Only
   activations: a weight made by a node (a Constant) is what the refit rewrites, so a
   held copy of it would be stale.
3. Memory: the kept tensors of all feeds stay under ``max_bytes``; when a frontier would
   pass it, nothing is kept and each call runs from the graph inputs (as a plain prefix
   capture would).
4. Sessions get the segment's large weights from the model's own bytes
   (``SessionOptions.add_external_initializers``), so building one does not serialize the weights.

The model may change between calls (weights rewritten, nodes added); what is kept is
named by tensor, so a name that survives an edit upstream of every change stays valid.
``prefix_model(model, names)`` is the plain prefix model of ``names``, for a capture that
runs once (``graphopt.sparsity.hessian``'s grouped convs).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import onnx

from ..errors import InputSpecError

logger = logging.getLogger(__name__)

Feed = Mapping[str, np.ndarray]

#: Initializers above this many bytes reach the session as arrays, not serialized bytes.
SHARED_BYTES = 1 << 16


class Segments:
    """Tensors kept between captures of one model on fixed ``feeds`` (module doc)."""

    def __init__(self, feeds: Sequence[Feed], *, max_bytes: int = 1 << 30,
                 providers: Sequence[str] = ("CPUExecutionProvider",)):
        self.feeds = list(feeds)
        self.max_bytes = max_bytes
        self.providers = tuple(providers)
        self.kept: list[dict[str, np.ndarray]] = [{} for _ in self.feeds]
        self.done: set[str] = set()  # tensors made by nodes that ran with the current model
        self.sessions = 0
        self.last_nodes = 0  # nodes the last ``run`` ran

    # ------------------------------------------------------------------ capture

    def run(self, model: onnx.ModelProto, names: Sequence[str],
            hold: Sequence[str] = ()) -> Iterator[dict]:
        names = list(dict.fromkeys(names))
        graph = model.graph
        feed_names = set(self.feeds[0]) if self.feeds else set()
        kept = set(self.kept[0]) if self.feeds else set()
        producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
        inputs = {vi.name for vi in graph.input} & feed_names
        direct = {n for n in names if n in inputs and n not in producer}
        unknown = [n for n in names if n not in producer and n not in direct and n not in kept]
        if unknown:
            raise InputSpecError(f"no node of the model makes {unknown} and no feed has it")
        need = _needed(graph, producer, [n for n in names if n not in kept], kept | inputs)
        readers = _readers(graph)
        made = {o for i in need for o in graph.node[i].output if o}
        done_after = self.done | made
        frontier = [t for t in sorted(made | kept)
                    if any(o not in done_after for j in readers.get(t, ())
                           for o in graph.node[j].output if o)]
        again = {t for t in hold if t in made or t in kept} - set(frontier)
        fetch = list(dict.fromkeys([n for n in names if n not in kept and n not in direct] +
                                   [t for t in frontier + sorted(again) if t not in kept]))
        session = arrays = None
        self.last_nodes = len(need)
        if need:
            seg, arrays = _segment(model, need, [t for t in kept if _reads(graph, need, t)],
                                   self.kept[0], fetch)
            session = _session(seg, arrays, self.providers)
            self.sessions += 1
        wanted = {i.name for i in session.get_inputs()} if session is not None else set()
        missing = (wanted - kept) - feed_names
        if missing:
            raise InputSpecError(f"calibration inputs lack {sorted(missing)}")
        keep_frontier = True
        try:
            for f, feed in enumerate(self.feeds):
                store = self.kept[f]
                values: dict[str, np.ndarray] = {n: feed[n] for n in direct}
                if session is not None and fetch:
                    args = {k: (store[k] if k in store else feed[k]) for k in wanted}
                    values.update(zip(fetch, session.run(fetch, args)))
                if f == 0:
                    size = sum(_nbytes(values.get(t, store.get(t))) for t in frontier)
                    more = sum(_nbytes(values.get(t, store.get(t))) for t in again)
                    keep_frontier = size * len(self.feeds) <= self.max_bytes
                    if (size + more) * len(self.feeds) <= self.max_bytes:
                        frontier = frontier + sorted(again)
                yield {n: values[n] if n in values else store[n] for n in names}
                if keep_frontier:
                    self.kept[f] = {t: values[t] if t in values else store[t]
                                    for t in frontier}
        except BaseException:  # stopped part-way (an error, or the caller let go): the
            self.clear()       # feeds would disagree on what is kept
            raise
        del arrays
        if keep_frontier:
            self.done = done_after
        else:
            logger.info("segments: a frontier of %d tensors passes %d bytes; not kept",
                        len(frontier), self.max_bytes)
            self.clear()

    def invalidate(self, model: onnx.ModelProto, names: Sequence[str]) -> None:
        """The nodes making ``names`` changed: they and everything after them did not run."""
        stale = set(names)
        for node in model.graph.node:  # topological: one pass reaches every descendant
            if any(x in stale for x in node.input if x) or \
                    any(o in stale for o in node.output):
                stale.update(o for o in node.output if o)
        self.done -= stale
        for store in self.kept:
            for t in [t for t in store if t in stale]:
                del store[t]

    def clear(self) -> None:
        self.kept = [{} for _ in self.feeds]
        self.done = set()


def segment_session(model: onnx.ModelProto, names: Sequence[str],
                    providers: Sequence[str] = ("CPUExecutionProvider",)):
    """A session computing ``names`` from the graph inputs: only the nodes they need, the
    large weights given to it as arrays over the model's bytes (module doc, 4)."""
    graph = model.graph
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    need = _needed(graph, producer, names, set())
    seg, arrays = _segment(model, need, [], {}, names)
    return _session(seg, arrays, providers)


# ------------------------------------------------------------------ graph walking


def prefix_model(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A model computing only ``names`` (as its outputs): the nodes they need, those nodes'
    constants, all graph inputs. onnxruntime runs every node of a graph whatever is fetched,
    so a capture of early tensors on the whole model would pay for the whole model."""
    from ..ir.graph import subgraph_refs

    graph = model.graph
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    need: set[int] = set()
    stack = [producer[n] for n in names if n in producer]
    while stack:
        i = stack.pop()
        if i in need:
            continue
        need.add(i)
        node = graph.node[i]
        for name in list(node.input) + sorted(subgraph_refs(node)):
            if name in producer and producer[name] not in need:
                stack.append(producer[name])
    used = {x for i in need for x in list(graph.node[i].input) +
            sorted(subgraph_refs(graph.node[i]))}
    out = empty_like(model)
    g = out.graph
    inits = {i.name for i in graph.initializer}
    g.input.extend(vi for vi in graph.input if vi.name not in inits or vi.name in used)
    g.initializer.extend(t for t in graph.initializer if t.name in used)
    g.node.extend(graph.node[i] for i in sorted(need))
    for name in names:
        g.output.add().name = name
    return out


def _readers(graph: onnx.GraphProto) -> dict[str, list[int]]:
    from ..ir.graph import node_reads

    out: dict[str, list[int]] = {}
    for i, node in enumerate(graph.node):
        for name in node_reads(node):
            out.setdefault(name, []).append(i)
    return out


def _needed(graph: onnx.GraphProto, producer: Mapping[str, int], names: Sequence[str],
            available: set[str]) -> list[int]:
    """Indices (graph order) of the nodes ``names`` need, not going past ``available``."""
    from ..ir.graph import node_reads

    need: set[int] = set()
    stack = [producer[n] for n in names if n in producer and n not in available]
    while stack:
        i = stack.pop()
        if i in need:
            continue
        need.add(i)
        for name in node_reads(graph.node[i]):
            if name in producer and name not in available and producer[name] not in need:
                stack.append(producer[name])
    return sorted(need)


def _reads(graph: onnx.GraphProto, nodes: Sequence[int], name: str) -> bool:
    from ..ir.graph import node_reads

    return any(name in node_reads(graph.node[i]) for i in nodes)


def _nbytes(value) -> int:
    return int(getattr(value, "nbytes", 0))


def _segment(model: onnx.ModelProto, nodes: Sequence[int], kept: Sequence[str],
             sample: Mapping[str, np.ndarray], outputs: Sequence[str],
             arrays_of: Mapping[str, np.ndarray] | None = None
             ) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The model of ``nodes`` with ``kept`` tensors as inputs (typed from ``sample``), and
    the large initializers it reads as arrays (``SHARED_BYTES``), left out of its bytes;
    ``arrays_of``: those arrays already made, by name (read instead of copied again)."""
    from ..ir.graph import node_reads

    graph = model.graph
    used = set()
    for i in nodes:
        used |= node_reads(graph.node[i])
    out = empty_like(model)
    g = out.graph
    g.input.extend(vi for vi in graph.input if vi.name in used or vi.name in outputs)
    for name in kept:
        value = sample[name]
        g.input.append(onnx.helper.make_tensor_value_info(
            name, onnx.helper.np_dtype_to_tensor_dtype(value.dtype),
            [None] * value.ndim))
    arrays: dict[str, np.ndarray] = {}
    for t in graph.initializer:
        if t.name not in used:
            continue
        array = arrays_of[t.name] if arrays_of and t.name in arrays_of else _shared(t)
        if array is None:
            g.initializer.append(t)
            continue
        arrays[t.name] = array
        stub = g.initializer.add()  # external data, given from memory (``_session``)
        stub.name, stub.data_type = t.name, t.data_type
        stub.dims.extend(t.dims)
        stub.data_location = onnx.TensorProto.EXTERNAL
        where = stub.external_data.add()
        where.key, where.value = "location", "graphopt-in-memory"
    g.node.extend(graph.node[i] for i in nodes)
    for name in outputs:
        g.output.add().name = name
    return out, arrays


def empty_like(model: onnx.ModelProto) -> onnx.ModelProto:
    """A model with ``model``'s IR version, opsets, functions and graph name, no graph."""
    out = onnx.ModelProto()
    out.ir_version = model.ir_version
    out.opset_import.extend(model.opset_import)
    out.functions.extend(model.functions)
    out.graph.name = model.graph.name
    return out


def _shared(t: onnx.TensorProto) -> np.ndarray | None:
    """A large initializer's values as an array over its bytes, or None (kept in the proto)."""
    if t.data_location == onnx.TensorProto.EXTERNAL or not t.HasField("raw_data") or \
            len(t.raw_data) < SHARED_BYTES or t.data_type not in _NUMERIC:
        return None
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
    return np.frombuffer(t.raw_data, dtype=dtype).reshape(tuple(t.dims))


_NUMERIC = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
            onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT32,
            onnx.TensorProto.INT64, onnx.TensorProto.INT16, onnx.TensorProto.UINT16,
            onnx.TensorProto.BOOL}


def _session(model: onnx.ModelProto, arrays: Mapping[str, np.ndarray], providers):
    import onnxruntime as ort

    from ..ir.model import serialized
    from ..runtime.session import session_options

    options = session_options()
    # captures alternate runs with numpy work (Gram products): ORT's threads spinning for
    # the next run would take the cores BLAS is using
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    values = {name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in arrays.items()}
    if values:
        options.add_external_initializers(list(values), list(values.values()))
    try:
        session = ort.InferenceSession(serialized(model), options, providers=list(providers))
    except Exception as exc:  # noqa: BLE001
        raise InputSpecError(f"cannot build a capture session: {exc}") from exc
    session._graphopt_arrays = (arrays, values)  # the session reads these buffers
    return session
