"""Token axes of an encoder: where the batch and sequence axes of its hidden states go.

Found on the ONNX graph alone, with the residual structure (``structure``) and the per-op
coupling handlers (``handlers``), never from node names:

1. The *entry* is the first layer's entry along the residual stream (the embeddings after
   their LayerNorm): a ``[B, S, H]`` tensor whose axes 0 and 1 are labelled ``B`` and ``S``.
2. The *mask* is the graph input that every attention block's Softmax depends on and that
   the entry does not (``attention_mask``), rank 2, of an integer, bool or float type; or
   the input named by the caller.
3. Labels flow forward through every node, along the links its coupling handler makes
   between an input axis and an output axis with an identity index map (so through
   elementwise ops, LayerNorm, MatMul free axes, Reshape/Transpose that move a whole axis,
   the ``Q·Kᵀ`` product, which keeps both sequence axes). Run on concrete example dims
   (``B=2, S=7`` unless the mask's dims are fixed), the handlers see real shapes.
4. A node is *token-wise* when it is a compute op (elementwise, activation, normalization,
   Softmax/reduction, MatMul/Gemm with a constant right operand), its labelled inputs and
   its outputs are all ``[B, S, ...]`` with ``B`` at axis 0 and ``S`` at axis 1, each label
   goes to the same axis, and every other input broadcasts over those two axes. Such a
   node computes each token from that token alone: it can run on the real tokens only.
5. A node where a label does not reach any output (contracted, a barrier, no handler)
   *mixes tokens*. Mixing is *bounded* when the node lies in an attention block of the
   structure whose Softmax depends on the mask (padded keys get no weight, whatever values
   they hold), or when it is a Gather/Slice with constant indices on the sequence axis (a
   selection, e.g. a pooler reading token 0: exact wherever the selected token is real).
   Any other mixing is unbounded and makes the analysis refuse the model, with the node.
6. ``Shape`` of a token-wise output is recorded apart: the rewrite answers it with the
   padded shape (the TorchScript export recomputes batch and sequence per layer).

``analyze_tokens(model, mask=None)`` returns a ``TokenAnalysis`` or a refusal (a string).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import onnx

from .view import GraphView, Member, Slot
from .structure import find_structure

logger = logging.getLogger(__name__)

# Ops that compute each output element from the same position of their inputs (after
# broadcasting) or reduce/normalize over trailing axes: candidates for token-wise.
TOKENWISE_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mean", "Sum", "Where", "Equal", "Less",
    "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Not", "PRelu", "Mod",
    "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Gelu", "Sigmoid", "HardSigmoid", "HardSwish",
    "Tanh", "Erf", "Exp", "Log", "Sqrt", "Reciprocal", "Neg", "Abs", "Sign", "Softplus",
    "Softsign", "Mish", "Swish", "Sin", "Cos", "Floor", "Ceil", "Round", "Clip", "Cast",
    "CastLike", "Identity", "Dropout", "IsNaN", "IsInf", "LayerNormalization",
    "SimplifiedLayerNormalization", "RMSNormalization", "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization", "FastGelu", "BiasGelu", "QuickGelu", "BiasAdd",
    "Softmax", "LogSoftmax", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin",
    "ReduceProd", "ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceLogSumExp", "MatMul",
    "Gemm",
})
SELECTION_OPS = frozenset({"Gather", "Slice"})
EXAMPLE_BATCH, EXAMPLE_SEQ = 2, 7
MASK_TYPES = {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.BOOL,
              onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8,
              onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.DOUBLE}


@dataclass
class TokenAnalysis:
    """What the unpad rewrite needs (node indices are positions in ``model.graph.node``)."""

    mask: str
    mask_type: int
    entry: str
    tokenwise: list[int]
    labels: dict[str, dict[int, str]]
    mixing: dict[int, str] = field(default_factory=dict)  # node -> what bounds it
    attention_blocks: int = 0
    attention_nodes: set[int] = field(default_factory=set)
    ranks: dict[str, int] = field(default_factory=dict)
    selections: dict[int, int] = field(default_factory=dict)  # Gather node -> token index

    def is_token_layout(self, tensor: str) -> bool:
        return self.labels.get(tensor) == {0: "B", 1: "S"}


def _ancestors(graph: onnx.GraphProto, producer: dict[str, int], names) -> set[str]:
    seen: set[str] = set()
    todo = deque(n for n in names if n)
    while todo:
        name = todo.popleft()
        if name in seen:
            continue
        seen.add(name)
        if name in producer:
            todo.extend(i for i in graph.node[producer[name]].input if i)
    return seen


def _declared(vi: onnx.ValueInfoProto) -> tuple | None:
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                 for d in tt.shape.dim)


def analyze_tokens(model: onnx.ModelProto, mask: str | None = None) -> TokenAnalysis | str:
    """The token analysis of ``model`` (module doc), or why it cannot be done."""
    graph = model.graph
    structure = find_structure(model)
    if not structure.layers:
        return "no residual stream found (no Add(x, f(x)) whose branch holds weights)"
    entry = structure.layers[0].entry
    attention = structure.blocks("attention")
    if not attention:
        return "no attention block found on the residual stream: nothing mixes tokens"
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    inits = {t.name for t in graph.initializer}
    inputs = {vi.name: vi for vi in graph.input if vi.name not in inits}
    if entry in inputs or entry not in producer:
        return f"the stream starts at graph input '{entry}': no embeddings to pack after"
    softmaxes = []
    for block in attention:
        found = [i for i in block.nodes if graph.node[i].op_type == "Softmax"]
        if not found:
            return (f"{block.site} has no Softmax (a fused attention op): its masking cannot "
                    "be checked")
        softmaxes.append((block, found))
    entry_anc = _ancestors(graph, producer, [entry])
    masked: dict[int, set[str]] = {}
    for block, found in softmaxes:
        for i in found:
            masked[i] = _ancestors(graph, producer, graph.node[i].input) & set(inputs)
    if mask is not None:
        if mask not in inputs:
            return f"mask '{mask}' is not a graph input (inputs: {', '.join(inputs)})"
        candidates = [mask]
    else:
        candidates = [n for n, vi in inputs.items() if n not in entry_anc and
                      len(_declared(vi) or ()) == 2 and all(n in s for s in masked.values())]
        if not candidates:
            return ("no attention-mask input: no rank-2 graph input reaches every attention "
                    "Softmax without also feeding the embeddings")
        if len(candidates) > 1:
            return (f"several inputs could be the attention mask ({', '.join(candidates)}); "
                    "name it with mask=NAME")
    mask = candidates[0]
    vi = inputs[mask]
    dims = _declared(vi)
    if dims is None or len(dims) != 2:
        return f"mask '{mask}' is not rank 2 [batch, sequence]"
    mtype = vi.type.tensor_type.elem_type
    if mtype not in MASK_TYPES:
        return f"mask '{mask}' has type {onnx.TensorProto.DataType.Name(mtype)}"
    for block, found in softmaxes:
        if not any(mask in masked[i] for i in found):
            return f"{block.site}: its Softmax does not depend on mask '{mask}'"
    example = tuple(d if isinstance(d, int) and d > 0 else e
                    for d, e in zip(dims, (EXAMPLE_BATCH, EXAMPLE_SEQ)))
    input_shapes = {}
    for name, other in inputs.items():
        od = _declared(other)
        if od is not None and len(od) >= 2 and tuple(od[:2]) == tuple(dims):
            input_shapes[name] = example + tuple(
                d if isinstance(d, int) and d > 0 else 1 for d in od[2:])
    view = GraphView(model, None, input_shapes)
    entry_shape = view.shape(entry)
    if entry_shape is None or len(entry_shape) < 3 or tuple(entry_shape[:2]) != example:
        return (f"the stream entry '{entry}' is not [batch, sequence, ...] like mask "
                f"'{mask}' (shape {entry_shape})")
    in_attention = {i: b for b in attention for i in b.nodes}
    result = TokenAnalysis(mask, mtype, entry, [], {entry: {0: "B", 1: "S"}},
                           attention_blocks=len(attention), attention_nodes=set(in_attention))
    problem = _propagate(view, result, in_attention)
    return problem or result


def _identity(ia: np.ndarray, ib: np.ndarray, dim: int | None) -> bool:
    return dim is not None and len(ia) == dim and np.array_equal(ia, ib) and \
        np.array_equal(ia, np.arange(dim))


def _propagate(view: GraphView, result: TokenAnalysis, in_attention) -> str:
    from .registry import couple_node

    labels = result.labels
    for idx, node in enumerate(view.nodes):
        labelled = [n for n in dict.fromkeys(node.input) if n in labels]
        if not labelled:
            continue
        if node.op_type in ("Shape", "Size"):
            continue
        nc = couple_node(view, idx)
        nc.index()
        outs: dict[str, dict[int, str]] = {}
        lost: list[str] = []
        for name in labelled:
            for axis, label in labels[name].items():
                m = Member(Slot(name), axis)
                reached = False
                for i in nc.by_member.get(m, ()):
                    a, b, ia, ib = nc.links[i]
                    other, (mi, oi) = (b, (ia, ib)) if a == m else (a, (ib, ia))
                    if other.slot.use is None and other.slot.tensor in node.output and \
                            _identity(mi, oi, view.member_dim(m)):
                        outs.setdefault(other.slot.tensor, {})[other.axis] = label
                        reached = True
                if not reached:
                    why = nc.failure or nc.blocks.get(m) or "contracted or merged"
                    lost.append(f"axis {axis} ({label}) of '{name}': {why}")
        for out, lab in outs.items():
            labels[out] = lab
            result.ranks[out] = len(view.shape(out) or ())
        if lost:
            bound = _bound(view, idx, in_attention, result.mask)
            if not bound:
                return (f"{view.node_label(idx)} mixes tokens outside a masked attention "
                        f"({lost[0]}); the analysis cannot bound it")
            result.mixing[idx] = bound
            index = view.const(node.input[1]) if node.op_type == "Gather" else None
            if index is not None and index.size == 1:
                result.selections[idx] = int(index.reshape(-1)[0])
            continue
        if _is_tokenwise(view, idx, labelled, outs, labels):
            result.tokenwise.append(idx)
    return ""


def _bound(view: GraphView, idx: int, in_attention, mask: str) -> str:
    node = view.nodes[idx]
    if idx in in_attention:
        return f"masked attention ({in_attention[idx].site})"
    if node.op_type in SELECTION_OPS and all(view.is_static(n) for n in node.input[1:] if n):
        return "selection of tokens by constant indices"
    return ""


def _is_tokenwise(view: GraphView, idx: int, labelled: list[str],
                  outs: dict[str, dict[int, str]], labels) -> bool:
    node = view.nodes[idx]
    if node.op_type not in TOKENWISE_OPS or not node.output:
        return False
    token = {0: "B", 1: "S"}
    if any(labels[n] != token for n in labelled):
        return False
    out_names = [o for o in node.output if o]
    if any(outs.get(o) != token for o in out_names):
        return False
    rank = len(view.shape(out_names[0]) or ())
    if rank < 3 or any(len(view.shape(n) or ()) != rank for n in labelled):
        return False
    if node.op_type == "Gemm":
        return False  # rank 2 only: never [B, S, ...]
    for k, name in enumerate(node.input):
        if not name or name in labelled:
            continue
        shape = view.shape(name)
        if shape is None:
            return False
        if node.op_type == "MatMul":
            if k != 1 or len(shape) > 2 or not view.is_const(name):
                return False
            continue
        lead = len(shape) - rank  # right-aligned broadcasting
        if any(lead + a >= 0 and shape[lead + a] != 1 for a in (0, 1)):
            return False
    return True


def selected_outputs(model: onnx.ModelProto, found: TokenAnalysis) -> dict[str, int]:
    """Graph outputs computed from one selected token (a pooler reading token 0): output ->
    that token's index. Their rows where the token is padding are meaningless."""
    graph = model.graph
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    out = {}
    for output in graph.output:
        seen, todo, picks = set(), [output.name], set()
        while todo:
            i = producer.get(todo.pop())
            if i is None or i in seen:
                continue
            seen.add(i)
            if i in found.selections:
                picks.add(found.selections[i])
                continue
            todo.extend(x for x in graph.node[i].input if x)
        if len(picks) == 1:
            out[output.name] = picks.pop()
    return out


# --------------------------------------------------------------------------- compaction


@dataclass
class CompactPlan:
    """Attention at the batch's longest real length ``L`` instead of the padded ``S``.

    ``region``: the attention blocks' nodes and their *side* computations (the mask bias,
    head-split shapes: ancestors of attention nodes that do not come from the token flow).
    ``shape_leaves``: ``Shape`` nodes of tensors from outside the region whose outputs the
    region reads (answered with ``[B, L, ...]``). ``mask_reads``: (node, input) pairs of the
    region that read the mask input (they read the compact mask instead).
    """

    region: set[int]
    shape_leaves: set[int]
    mask_reads: list[tuple[int, int]]


def compact_plan(model: onnx.ModelProto, found: TokenAnalysis) -> CompactPlan | str:
    """Whether the attention blocks can run on row-compacted tokens, or why not.

    Keys are reordered (each row's real tokens first), which attention does not see: the
    mask bias is recomputed from the compact mask, and nothing may bring the positions in
    (a side computation reading a learned table, a relative-position bias, is refused),
    nor may the sequence length be baked into constants (a fixed-length mask is refused).
    """
    graph = model.graph
    nodes = list(graph.node)
    inits = {t.name for t in graph.initializer}
    inputs = {vi.name: vi for vi in graph.input if vi.name not in inits}
    dims = _declared(inputs[found.mask]) or ()
    if len(dims) == 2 and isinstance(dims[1], int) and dims[1] > 0:
        return "the sequence length is fixed: constants may hold it"
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for name in n.input:
            if name:
                consumers.setdefault(name, []).append(i)
    static = set(inits)
    for i, n in enumerate(nodes):
        if n.op_type == "Constant" or (n.input and all(x in static for x in n.input if x)
                                       and any(n.input)):
            static.update(o for o in n.output if o)
    attention = found.attention_nodes
    tokenwise = set(found.tokenwise)
    def token_shaped(x: str) -> bool:
        return x in found.labels or x == found.entry or (
            x in inputs and (_declared(inputs[x]) or ())[:2] == dims)

    region = set(attention) - tokenwise
    leaves = {i for i in region if nodes[i].op_type == "Shape" and
              producer.get(nodes[i].input[0]) not in region and token_shaped(nodes[i].input[0])}
    region -= leaves
    todo = list(region)
    while todo:
        i = todo.pop()
        for name in nodes[i].input:
            if not name or name in static or name == found.mask:
                continue
            p = producer.get(name)
            if p is None:
                if name in inputs:
                    return f"{_label(nodes[i])} reads input '{name}' by value"
                continue
            if p in region or p in tokenwise or p in leaves:
                continue
            node = nodes[p]
            if node.op_type == "Shape" and token_shaped(node.input[0]):
                leaves.add(p)
                continue
            if name in found.labels:
                return (f"{_label(nodes[i])} reads '{name}' ([batch, sequence] hidden "
                        "states) without packing")
            if node.op_type == "Size":
                return f"{_label(node)} counts tokens"
            for x in node.input:
                if x in inits:
                    t = next(t for t in graph.initializer if t.name == x)
                    if t.data_type in _FLOAT_DATA and int(np.prod(t.dims)) > 1:
                        return (f"{_label(node)} feeds attention from the learned table "
                                f"'{x}' (a position bias?)")
            region.add(p)
            todo.append(p)
    outputs = {o.name for o in graph.output}
    for i in region:
        for out in nodes[i].output:
            if out in outputs:
                return f"'{out}' (computed at the compact length) is a graph output"
            for c in consumers.get(out, ()):
                if c not in region and c not in tokenwise and c not in leaves:
                    return (f"'{out}' (computed at the compact length) is read by "
                            f"{_label(nodes[c])} outside attention")
    reads = [(i, k) for i in region for k, name in enumerate(nodes[i].input)
             if name == found.mask]
    return CompactPlan(region, leaves, reads)


_FLOAT_DATA = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
               onnx.TensorProto.BFLOAT16}


def _label(node: onnx.NodeProto) -> str:
    return f"{node.op_type} '{node.name or node.output[0]}'"
