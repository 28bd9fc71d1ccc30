"""Depth structure: the residual stream and the single-entry, single-exit blocks along it.

Found on the ONNX graph alone, the same way for every exporter:

1. A *residual* is an ``Add(a, b)`` where ``a`` is an ancestor of ``b`` and the branch from
   ``a`` to ``b`` holds a weight-bearing op (MatMul/Gemm/Conv with a constant operand) and
   no other residual Add. ``a`` is the skip input; the weight test keeps out
   ``x + 0.044715·x³`` inside GELU, the second an attention mask added to the scores of
   every layer (later layers' scores depend on it through earlier layers). A residual
   nested inside another's branch therefore hides the outer one.
2. Its branch is classified: ``attention`` (a Softmax, a MatMul of two activations, or a
   fused attention op), else ``residual`` (a Conv: ResNet), else ``mlp``; attention and MLP
   off the same skip (GPT-J, Falcon) are one ``parallel`` residual (``_merge_parallel``).
3. Post-norm (BERT, ResNet): the Add output runs through a normalization (LayerNormalization,
   RMS/Simplified forms, BatchNorm, Relu, or a decomposed Reduce/Sub/Div/Mul/Sqrt region) and
   that output is the next residual's skip input, so the norm belongs to the block. Pre-norm
   (GPT-2, LLaMA): the Add output itself is the next skip input; the norm sits in the branch.
   A residual with no successor (the last one) follows its chain's style, else the model's.
4. Sub-blocks are the residuals (entry = skip input, exit = Add output or its post-norm);
   layers group consecutive sub-blocks of a chain, closing each layer at an mlp sub-block,
   so attention (+ cross-attention) + mlp make one layer; a Conv residual is a layer alone.
5. A block's nodes are those on paths from its entry to its exit. Side inputs (attention mask,
   rotary cos/sin, position ids: anything not computed from the entry) may enter. The block
   is removable when no tensor computed from the entry's *data* inside it is used outside it
   (a graph output such as a KV-cache ``present`` tensor, or another layer), and its entry and
   exit shapes agree where known. Tensors that depend on the entry only through ``Shape``
   may leave the block (exporters build masks from ``Shape(embeddings)``): removal keeps them.
6. ``graphopt.prune.blocks.remove_blocks`` rewires every consumer of an exit (nodes and
   graph outputs) to the block's entry, following chains of removed neighbours, and deletes
   what became dead.

``Block.nodes`` are positions in ``model.graph.node`` of the model that was analysed.
"""

from __future__ import annotations

import heapq
import logging
from collections import deque
from dataclasses import dataclass

import onnx

from graphopt.errors import GraphoptError
from graphopt.ir.graph import GraphIndex

logger = logging.getLogger(__name__)

WEIGHT_OPS = frozenset({
    "MatMul", "Gemm", "Conv", "ConvTranspose", "MatMulInteger", "QLinearMatMul", "QLinearConv",
    "ConvInteger", "MatMulNBits", "FusedMatMul", "Attention", "MultiHeadAttention",
    "GroupQueryAttention",
})
ATTENTION_OPS = frozenset({
    "Softmax", "Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention",
    "PackedMultiHeadAttention", "DecoderMaskedMultiHeadAttention", "SparseAttention",
})
CONV_OPS = frozenset({"Conv", "ConvTranspose", "QLinearConv", "ConvInteger"})
# Single ops that may normalize a residual sum after the Add (post-norm).
NORM_OPS = frozenset({
    "LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization",
    "BatchNormalization", "InstanceNormalization", "GroupNormalization", "Relu",
})
# Ops a decomposed LayerNorm/RMSNorm is made of.
DECOMPOSED_NORM_OPS = frozenset({
    "ReduceMean", "ReduceSumSquare", "ReduceL2", "ReduceSum", "Sub", "Pow", "Mul", "Div", "Add",
    "Sqrt", "Reciprocal", "Cast", "Identity", "Neg",
})
SHAPE_OPS = frozenset({"Shape", "Size"})
PASSTHROUGH_OPS = frozenset({"Identity", "Dropout"})
_DECOMPOSED_WINDOW = 24

Dims = tuple


@dataclass(frozen=True)
class Block:
    """A single-entry, single-exit region along the residual stream.

    ``kind``: ``"layer"``, ``"attention"``, ``"mlp"``, ``"residual"`` (Conv), ``"parallel"``.
    ``index``: the layer's position along the stream; a sub-block carries its layer's index.
    ``norm``: ``"post"`` when the normalization after the Add is inside the block.
    """

    index: int
    kind: str
    entry: str
    exit: str
    nodes: tuple[int, ...]
    removable: bool
    reason: str = ""
    norm: str = "pre"

    @property
    def site(self) -> str:
        return f"{self.kind} {self.index} ({self.entry} -> {self.exit})"


@dataclass(frozen=True)
class Structure:
    """The layers and sub-blocks of a model, in stream order."""

    layers: tuple[Block, ...] = ()
    sublayers: tuple[Block, ...] = ()
    norm: str = ""  # "pre", "post", "mixed", or "" when no residual was found

    def blocks(self, kind: str = "layer") -> tuple[Block, ...]:
        if kind == "layer":
            return self.layers
        return tuple(b for b in self.sublayers if b.kind == kind)

    @property
    def stream(self) -> tuple[str, ...]:
        """Entry of every layer, then the last layer's exit."""
        if not self.layers:
            return ()
        return tuple(b.entry for b in self.layers) + (self.layers[-1].exit,)


# --------------------------------------------------------------------------- graph index


class StructureIndex:
    """Producers, consumers, topological positions and static (input-free) tensors."""

    def __init__(self, graph: onnx.GraphProto):
        index = GraphIndex(graph)
        self.nodes = index.nodes
        self.producer: dict[str, int] = index.position
        self.inputs: list[list[str]] = index.reads
        self.consumers: dict[str, list[int]] = {
            name: index.reader_positions(name) for name in index.slots}
        self.outputs = {o.name for o in graph.output}
        self.order = index.topological_order()
        if len(self.order) != len(self.nodes):
            raise GraphoptError("the graph has a cycle; run the cleanup pass or re-export it")
        self.position = {n: p for p, n in enumerate(self.order)}
        inits = {t.name for t in graph.initializer} | {t.values.name for t in
                                                         graph.sparse_initializer}
        graph_inputs = {i.name for i in graph.input} - inits
        self.static: set[str] = set(inits)
        for i in self.order:
            node = self.nodes[i]
            ins = self.inputs[i]
            if node.op_type == "Constant" or (
                    ins and all(n in self.static and n not in graph_inputs for n in ins)):
                self.static.update(o for o in node.output if o)

    def _floor(self, tensor: str) -> int:
        """Position of the tensor's producer (-1 for inputs and initializers): everything
        computed from it sits after this position."""
        p = self.producer.get(tensor)
        return self.position[p] if p is not None else -1

    def between(self, entry: str, exit_: str) -> set[int]:
        """Nodes on paths from ``entry`` to ``exit_`` (the exit's producer included).

        Only nodes placed between the two in topological order can be on such a path, so
        both searches stay inside that window instead of walking the whole graph.
        """
        start = self.producer.get(exit_)
        floor = self._floor(entry)
        if start is None or self.position[start] <= floor:
            return set()
        back = {start}
        todo = deque([start])
        while todo:
            i = todo.popleft()
            for name in self.inputs[i]:
                p = self.producer.get(name)
                if p is not None and p not in back and self.position[p] > floor:
                    back.add(p)
                    todo.append(p)
        seen: set[int] = set()
        todo = deque(c for c in self.consumers.get(entry, ()) if c in back)
        while todo:
            i = todo.popleft()
            if i in seen:
                continue
            seen.add(i)
            for out in self.nodes[i].output:
                todo.extend(c for c in self.consumers.get(out, ()) if c in back)
        return seen

    def first_descendants(self, tensor: str, count: int) -> list[int]:
        """The first ``count`` nodes computed from ``tensor``, in topological order."""
        heap = [(self.position[c], c) for c in set(self.consumers.get(tensor, ()))]
        heapq.heapify(heap)
        seen = {c for _, c in heap}
        found = []
        while heap and len(found) < count:
            _, i = heapq.heappop(heap)
            found.append(i)
            for out in self.nodes[i].output:
                for c in self.consumers.get(out, ()):
                    if c not in seen:
                        seen.add(c)
                        heapq.heappush(heap, (self.position[c], c))
        return found

    def is_ancestor(self, a: str, b: str) -> bool:
        """``a`` is an ancestor of ``b`` (``b`` depends on ``a``)."""
        start = self.producer.get(b)
        floor = self._floor(a)
        if start is None or self.position[start] <= floor:
            return False
        seen = {start}
        todo = deque([start])
        while todo:
            i = todo.popleft()
            for name in self.inputs[i]:
                if name == a:
                    return True
                p = self.producer.get(name)
                if p is not None and p not in seen and self.position[p] > floor:
                    seen.add(p)
                    todo.append(p)
        return False

    def escapes(self, nodes: set[int], entry: str, exit_: str, *,
                allow_outputs: bool = False) -> str:
        """Why the region is not single-exit ("" when it is); see case 5 of the module doc.

        ``allow_outputs``: tensors that leave only as graph outputs do not count.
        """
        data = self._data_dependent(nodes, entry)
        for i in sorted(nodes, key=self.position.__getitem__):
            for out in self.nodes[i].output:
                if not out or out == exit_ or i not in data:
                    continue
                if out in self.outputs and not allow_outputs:
                    return f"tensor '{out}' computed inside the block is a graph output"
                outside = [c for c in self.consumers.get(out, ()) if c not in nodes]
                if outside:
                    user = self.nodes[outside[0]]
                    return (f"tensor '{out}' computed inside the block is also used by "
                            f"{user.op_type} node '{user.name or outside[0]}' outside it")
        return ""

    def _data_dependent(self, nodes: set[int], entry: str) -> set[int]:
        """Nodes of the region whose outputs depend on the entry's values, not only its shape."""
        data_tensors = {entry}
        data: set[int] = set()
        for i in sorted(nodes, key=self.position.__getitem__):
            node = self.nodes[i]
            if node.op_type in SHAPE_OPS:
                continue
            if any(n in data_tensors for n in self.inputs[i]):
                data.add(i)
                data_tensors.update(o for o in node.output if o)
        return data


# --------------------------------------------------------------------------- residuals


@dataclass
class _Residual:
    add: int
    skip: str
    branch: str
    out: str
    kind: str
    alias: str  # the Add output after value-preserving ops (Identity, Dropout, same-type Cast)
    post: str  # tensor after a post-norm following the Add ("" when none)


def _find_residuals(idx: StructureIndex, shapes: dict[str, tuple]) -> list[_Residual]:
    found = []
    spans: dict[int, set[int]] = {}
    for i in idx.order:
        node = idx.nodes[i]
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        x, y = node.input
        if not x or not y or x == y or x in idx.static or y in idx.static:
            continue
        if idx.is_ancestor(x, y):
            skip, branch = x, y
        elif idx.is_ancestor(y, x):
            skip, branch = y, x
        else:
            continue
        out = node.output[0]
        if _shape_mismatch(shapes, skip, out):
            continue
        nodes = idx.between(skip, branch)
        kind = _branch_kind(idx, nodes)
        if kind:
            found.append(_Residual(i, skip, branch, out, kind, "", ""))
            spans[i] = nodes
    # A tensor that feeds every layer (an attention mask added to the scores) is an ancestor
    # of later layers' branches too; such a "branch" spans whole earlier layers, residual
    # Adds included, where a real branch holds none. Taken in topological order, earlier
    # (real) residuals are accepted before the spans that would swallow them.
    accepted: list[_Residual] = []
    adds: set[int] = set()
    for r in found:
        if not spans[r.add] & adds:
            accepted.append(r)
            adds.add(r.add)
    found = _merge_parallel(idx, accepted)
    for r in found:
        r.alias = _passthrough(idx, r.out, shapes)
        r.post = _post_norm(idx, r.alias, shapes)
    return found


def _merge_parallel(idx: StructureIndex, found: list[_Residual]) -> list[_Residual]:
    """Parallel residuals (GPT-J, Falcon, GPT-NeoX, PaLM: ``x + attn(ln x) + mlp(ln' x)``).
    1. ``Add(x, Add(attn, mlp))``: found as one residual; its kind becomes ``parallel``.
    2. ``Add(Add(x, attn), mlp)``: the outer Add's other input, a branch from the same skip,
       joins the residual, then ending at the outer Add (the inner sum feeding it only)."""
    by_out = {r.out: r for r in found}
    adds = {r.add for r in found}
    for r in found:
        node = idx.nodes[idx.producer[r.branch]]
        if r.kind == "attention" and node.op_type == "Add" and all(
                _branch_kind(idx, idx.between(r.skip, t)) for t in node.input) and not any(
                idx.is_ancestor(a, b) for a, b in (node.input, node.input[::-1])):
            r.kind = "parallel"
    for i in idx.order:
        node = idx.nodes[i]
        if node.op_type != "Add" or len(node.input) != 2 or i in adds:
            continue
        for p, q in (tuple(node.input), tuple(node.input)[::-1]):
            r = by_out.get(p)
            if r is None or not q or q in idx.static or len(idx.consumers.get(p, ())) != 1 \
                    or not idx.is_ancestor(r.skip, q) or idx.is_ancestor(p, q):
                continue
            if not _branch_kind(idx, branch := idx.between(r.skip, q)) or branch & adds:
                continue
            del by_out[p]
            r.add, r.out, r.kind = i, node.output[0], "parallel"
            by_out[r.out] = r
            adds.add(i)
            break
    return found


def _branch_kind(idx: StructureIndex, nodes: set[int]) -> str:
    """"attention", "residual" (conv) or "mlp"; "" when the branch holds no weights."""
    ops = {idx.nodes[i].op_type for i in nodes}
    weighted = any(idx.nodes[i].op_type in WEIGHT_OPS and
                   any(n in idx.static for n in idx.inputs[i]) for i in nodes)
    if not weighted:
        return ""
    two_activations = any(
        idx.nodes[i].op_type == "MatMul" and not any(n in idx.static for n in idx.inputs[i])
        for i in nodes)
    if ops & ATTENTION_OPS or two_activations:
        return "attention"
    if ops & CONV_OPS:
        return "residual"
    return "mlp"


def _passthrough(idx: StructureIndex, tensor: str, shapes: dict[str, tuple]) -> str:
    """Follow single-consumer ops that keep values: Identity, Dropout, a same-type Cast."""
    current = tensor
    while current not in idx.outputs:
        users = idx.consumers.get(current, [])
        if len(users) != 1:
            break
        node = idx.nodes[users[0]]
        if node.input[0] != current:
            break
        if node.op_type == "Cast":
            to = next((a.i for a in node.attribute if a.name == "to"), None)
            known = shapes.get(current)
            if known is None or to != known[0]:
                break
        elif node.op_type not in PASSTHROUGH_OPS:
            break
        current = node.output[0]
    return current


def _post_norm(idx: StructureIndex, tensor: str, shapes: dict[str, tuple]) -> str:
    """The output of a normalization applied to ``tensor`` alone, or "" when there is none."""
    current = tensor
    while True:
        users = idx.consumers.get(current, [])
        if current in idx.outputs or not users:
            break
        if len(users) == 1 and idx.nodes[users[0]].op_type in NORM_OPS:
            node = idx.nodes[users[0]]
            if node.input[0] == current and all(n in idx.static for n in idx.inputs[users[0]][1:]):
                current = _passthrough(idx, node.output[0], shapes)
                continue
            break
        nxt = _decomposed_norm(idx, current)
        if not nxt:
            break
        current = _passthrough(idx, nxt, shapes)
    return current if current != tensor else ""


def _decomposed_norm(idx: StructureIndex, tensor: str) -> str:
    """The end of a decomposed norm applied to ``tensor`` alone, or "".

    Walks from post-dominator to post-dominator (``x - mean(x)``, then ``·/sqrt(var+eps)``,
    then ``·γ``, ``+β``) while each step's region holds only norm arithmetic with constant
    side inputs; the whole must reduce at least once.
    """
    current, ops = tensor, []
    while True:
        step = _post_dominator(idx, current)
        if not step:
            break
        out, region = step
        region_ops = [idx.nodes[j].op_type for j in region]
        side = {n for j in region for n in idx.inputs[j]} - {
            o for j in region for o in idx.nodes[j].output} - {current}
        if not all(op in DECOMPOSED_NORM_OPS for op in region_ops) or not all(
                n in idx.static for n in side):
            break
        ops.extend(region_ops)
        current = out
    if current != tensor and len(ops) >= 3 and any(op.startswith("Reduce") for op in ops):
        return current
    return ""


def _post_dominator(idx: StructureIndex, tensor: str) -> tuple[str, set[int]] | None:
    """The nearest tensor every use of ``tensor`` flows into, with the region between."""
    if tensor in idx.outputs or not idx.consumers.get(tensor):
        return None
    for i in idx.first_descendants(tensor, _DECOMPOSED_WINDOW):
        out = idx.nodes[i].output[0]
        region = idx.between(tensor, out)
        if all(c in region for c in idx.consumers[tensor]) and not idx.escapes(
                region, tensor, out):
            return out, region
    return None


# --------------------------------------------------------------------------- chains


def _chains(residuals: list[_Residual]) -> tuple[list[list[tuple[_Residual, str]]], str]:
    """Residuals linked along the stream, each with its exit tensor; and the overall style."""
    by_skip: dict[str, list[_Residual]] = {}
    for r in residuals:
        by_skip.setdefault(r.skip, []).append(r)
    nxt: dict[int, tuple[_Residual, str]] = {}
    has_prev: set[int] = set()
    for r in residuals:
        for tensor, style in ((r.alias, "pre"), (r.post, "post")):
            if tensor and tensor in by_skip:
                succ = by_skip[tensor][0]
                nxt[r.add] = (succ, style)
                has_prev.add(succ.add)
                break
    styles = {style for _, style in nxt.values()}
    overall = "mixed" if len(styles) > 1 else (styles.pop() if styles else "")
    chains = []
    for r in residuals:
        if r.add in has_prev:
            continue
        links: list[tuple[_Residual, str]] = []
        chain_styles = []
        cur: _Residual | None = r
        while cur is not None:
            step = nxt.get(cur.add)
            links.append((cur, step[1] if step else ""))
            if step:
                chain_styles.append(step[1])
            cur = step[0] if step else None
        fallback = overall if overall != "mixed" else "pre"
        last_style = chain_styles[-1] if chain_styles else fallback
        chain = []
        for res, style in links:
            style = style or last_style
            exit_ = res.post if style == "post" and res.post else res.alias
            chain.append((res, exit_))
        chains.append(chain)
    return chains, overall or ("pre" if residuals else "")


def _group_layers(chain: list[tuple[_Residual, str]]) -> list[list[tuple[_Residual, str]]]:
    """Close a layer after each mlp or conv sub-block; trailing attention blocks stand alone."""
    layers: list[list[tuple[_Residual, str]]] = []
    current: list[tuple[_Residual, str]] = []
    for item in chain:
        current.append(item)
        if item[0].kind in ("mlp", "residual", "parallel"):
            layers.append(current)
            current = []
    layers.extend([item] for item in current)
    return layers


def _known_shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    """name -> (elem_type, dims) from the model's inputs, value_info and outputs."""
    shapes: dict[str, tuple] = {}
    for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        tt = vi.type.tensor_type
        if not tt.elem_type:
            continue
        dims = None
        if tt.HasField("shape"):
            dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                         for d in tt.shape.dim)
        shapes[vi.name] = (tt.elem_type, dims)
    return shapes


def _inferred_shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    """Types and shapes of every tensor: the model's own value_info, else inferred on a copy."""
    from graphopt.ir.strip import stripped_copy
    from .shapes import infer_shapes

    if len(model.graph.value_info) >= len(model.graph.node) // 2:
        return _known_shapes(model)
    work = stripped_copy(model)
    return _known_shapes(infer_shapes(work, symbolic=False))


def _shape_mismatch(shapes: dict[str, tuple], entry: str, exit_: str) -> str:
    a, b = shapes.get(entry), shapes.get(exit_)
    if a is None or b is None:
        return ""
    if a[0] != b[0]:
        return (f"exit type {onnx.TensorProto.DataType.Name(b[0])} differs from entry type "
                f"{onnx.TensorProto.DataType.Name(a[0])}")
    da, db = a[1], b[1]
    if da is None or db is None:
        return ""
    if len(da) != len(db) or any(
            isinstance(x, int) and isinstance(y, int) and x != y for x, y in zip(da, db)):
        return f"exit shape {list(db)} differs from entry shape {list(da)}"
    return ""


def _make_block(idx: StructureIndex, shapes, index: int, kind: str, entry: str, exit_: str,
                norm: str) -> Block:
    nodes = idx.between(entry, exit_)
    reason = _shape_mismatch(shapes, entry, exit_) or idx.escapes(nodes, entry, exit_)
    return Block(index, kind, entry, exit_, tuple(sorted(nodes, key=idx.position.__getitem__)),
                 not reason, reason, norm)


def find_structure(model: onnx.ModelProto) -> Structure:
    """The residual stream's layers and sub-blocks (see the module doc)."""
    idx = StructureIndex(model.graph)
    shapes = _inferred_shapes(model)
    residuals = _find_residuals(idx, shapes)
    if not residuals:
        return Structure()
    chains, style = _chains(residuals)
    layers: list[Block] = []
    subs: list[Block] = []
    for chain in sorted(chains, key=lambda c: idx.position[c[0][0].add]):
        for group in _group_layers(chain):
            index = len(layers)
            for res, exit_ in group:
                norm = "post" if exit_ != res.alias else "pre"
                subs.append(_make_block(idx, shapes, index, res.kind, res.skip, exit_, norm))
            first, last = group[0], group[-1]
            norm = "post" if last[1] != last[0].alias else "pre"
            layers.append(_make_block(idx, shapes, index, "layer", first[0].skip, last[1], norm))
    logger.debug("found %d layers (%s-norm) and %d sub-blocks", len(layers), style, len(subs))
    return Structure(tuple(layers), tuple(subs), style)
