"""``cleanup``: dead code, Identity/Dropout, constant folding, duplicate initializers.

Lossless: outputs stay bit-identical except where folding moves a computation from run time
to save time (the same kernels compute it, so in practice they stay identical too).

1. Identity and inference-mode Dropout nodes are bypassed: their consumers read the input.
   When the node's output is a graph output, the producer's output is renamed to it, so the
   graph's interface keeps its names; when that is impossible (the input is a graph input,
   an initializer or another graph output) the node stays, reported as a skip.
2. Dead nodes (no path to a graph output) and unused initializers are removed. A name read
   only inside an If/Loop/Scan body counts as used: bodies read outer-scope names directly.
3. Constant folding (``fold_constants``): ``Shape``/``Size`` of a tensor whose dims the
   model proves static (from its inputs and ops; declared ``value_info`` and graph-output
   shapes are hints, never folded from) become constants, then onnx-graphsurgeon evaluates, through onnxruntime, every node whose
   inputs are all constant. A folded tensor larger than ``max_fold_bytes`` is refused (a
   ``Tile`` or ``Expand`` of a constant would bloat the file). Never folded: random ops,
   quantization ops (folding would store dequantized weights), nodes with subgraphs, nodes
   reading an initializer that is also a graph input (the user may override it), and nodes
   producing a graph output.
4. Initializers with the same dtype, shape and bytes are merged into one
   (``deduplicate_initializers``).
5. Subgraphs are not optimized; renames reach into them where they read an outer name.

Graph-editing helpers shared with the other passes live in ``graphopt.ir.graph``.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from graphopt.errors import ConfigError
from graphopt.ir.graph import (
    ONNX_DOMAINS,
    GraphIndex,
    attr,
    drop_initializers,
    drop_value_info,
    ir3_inputs_kept,
    node_reads,
    remove_nodes,
    remove_passthrough,
    rename_inputs,
    site,
    subgraphs,
)
from graphopt.core.contract import Context, Pass, PassResult, Skip
from graphopt.core.registry import register
from graphopt.ir.tidy import remove_dead_nodes, remove_unused_initializers

# Domains onnxruntime evaluates out of the box; other custom ops are never folded.
_FOLDABLE_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft")
_RANDOM_OPS = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
               "Multinomial", "Bernoulli"}
_QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}


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
class Cleanup(Pass[CleanupConfig], name="cleanup", lossless=True):
    """Remove dead code, Identity/Dropout, fold constants, merge duplicate initializers.

    See the module docstring for the numbered cases.
    """

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
            counters["initializers_removed"] = remove_unused_initializers(graph, model.ir_version)
            if self.config.deduplicate_initializers:
                overridable = GraphIndex(graph, model.ir_version).overridable
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
    return remove_dead_nodes(graph)


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
    """Replace Shape/Size of tensors whose dims the model proves static with initializers.

    Proven means inferred from the graph inputs' dims and the ops alone
    (``analysis.facts.proven_shapes``): a declared ``value_info`` or graph-output shape is an
    exporter's hint, often stale, and never folded from.
    """
    from graphopt.analysis.facts import proven_shapes

    graph = model.graph
    idx = GraphIndex(graph, model.ir_version)
    wanted = [n for n in graph.node if n.domain in ONNX_DOMAINS and n.op_type in ("Shape", "Size")
              and not idx.is_constant(n.input[0]) and n.output[0] not in idx.graph_outputs]
    if not wanted:
        return
    shapes = proven_shapes(model)
    folded = []
    for node in wanted:
        shape = shapes.get(node.input[0])
        if shape is None or any(d is None for d in shape):
            continue
        shape = list(shape)
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
