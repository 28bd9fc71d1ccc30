"""``drop-nan-guard``: remove the NaN guard after an attention Softmax (lossless on rows
with a real token).

PyTorch's ``scaled_dot_product_attention``, as transformers 5 exports it (TorchScript,
opset 14 and later), guards the attention probabilities: ``p = Where(IsNaN(s), 0, s)`` with
``s = Softmax(x)``, ``x = scores + Where(mask, 0, -inf)``. The guard is for a row masked in
full (a sentence with no real token): the softmax of a row of ``-inf`` is NaN. It costs two
passes over every ``[batch, heads, S, S]`` probability tensor: on all-MiniLM-L6-v2
unpadded and int8, ~15% of the run time at batch 32 (benchmarks/FRONTIER.md).

1. A guard is ``Where(IsNaN(s), z, s)`` with ``s`` the output of a ``Softmax`` and ``z`` a
   constant; readers of the guard read ``s`` and the guard goes, with its ``IsNaN`` when
   nothing else reads it.
2. It goes only when ``x`` is finite whenever the activations are: walking back from ``x``,
   the walk stops at the nodes that compute the scores from activations (``MatMul``,
   ``Gemm``, ``FusedMatMul``) and at ops whose outputs are ints or bools; every other node
   on the way must map finite values to finite values (``_FINITE_OPS``: arithmetic without
   division, selections, casts, shape and index ops; ``Div`` only by a non-zero constant),
   no float graph input may be on the way (a caller's additive mask may hold ``-inf``), and
   every constant on the way must be finite or ``-inf``. Anything else is a skip with the
   first node or constant that breaks the argument, and the guard stays.
3. A ``-inf`` constant on the way (the mask fill) is replaced, for the readers on the way,
   by ``finfo(dtype).min`` (transformers' own fill in its eager attention). In a row with at
   least one real key that changes nothing: ``exp(finfo.min + score - max)`` is exactly 0 in
   float32, as ``exp(-inf)`` is; the guard then never fires. A row with no real key (a batch
   row whose mask is all padding) gets uniform weights instead of zeros: such rows are the
   one place the result differs, and ``compare_outputs`` leaves them out (their values mean
   nothing, as padded tokens' do for ``unpad-tokens``). The fill is replaced only when what
   its readers compute flows into the guarded softmaxes alone (else a skip).
4. "Finite activations": below float32 overflow (``finfo.min`` plus a score becomes
   ``-inf`` only for scores near ``-1e31``). A guard whose output is a graph output stays.

The manager checks the result like every lossless pass (outputs match the original, rows
with no real token aside).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from graphopt.core.contract import Context, NoConfig, Pass, PassResult, Skip
from graphopt.core.registry import register
from graphopt.ir.graph import (ONNX_DOMAINS, GraphIndex, attr, drop_value_info,
                               prune_orphans, remove_nodes, rename_inputs, site, unique_name)

# Where the walk back from the Softmax input stops: the scores, computed from activations.
_SCORES = {"MatMul", "Gemm", "FusedMatMul"}
# Ops whose outputs are finite when their inputs are (or that make ints and bools).
_FINITE_OPS = {
    "Add", "Sub", "Mul", "Neg", "Abs", "Relu", "Max", "Min", "Clip", "Where", "Cast",
    "CastLike", "Expand", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Transpose",
    "Gather", "GatherElements", "GatherND", "Slice", "Concat", "Split", "Tile", "Identity",
    "Pad", "Range", "ConstantOfShape", "CumSum", "ReduceSum", "ReduceMax", "ReduceMin",
    "TopK", "ScatterND", "ScatterElements", "Sign", "Floor", "Ceil", "Round", "Constant",
    "Trilu",
}
# Ops whose outputs are ints or bools: what they read does not matter, the walk stops.
_INDEX_OPS = {"Shape", "Size", "NonZero", "Equal", "Less", "LessOrEqual", "Greater",
              "GreaterOrEqual", "Not", "And", "Or", "Xor", "IsNaN", "IsInf", "ArgMax",
              "ArgMin"}
_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE,
                TensorProto.BFLOAT16}
_MAX_WALK = 400


def _guard(node: onnx.NodeProto, idx: GraphIndex) -> tuple[onnx.NodeProto, onnx.NodeProto] | None:
    """(IsNaN, Softmax) when ``node`` is ``Where(IsNaN(s), const, s)``, s = Softmax(x)."""
    if node.op_type != "Where" or node.domain not in ONNX_DOMAINS or len(node.input) != 3:
        return None
    isnan = idx.producer.get(node.input[0])
    softmax = idx.producer.get(node.input[2])
    if (isnan is None or softmax is None or isnan.op_type != "IsNaN"
            or softmax.op_type != "Softmax" or isnan.input[0] != node.input[2]
            or not idx.is_constant(node.input[1])):
        return None
    return isnan, softmax


def _not_finite(value: np.ndarray) -> bool:
    return value.dtype.kind in "fc" and not bool(np.isfinite(value).all())


@dataclass
class _Walk:
    """What walking back from one Softmax input found (module doc, 2)."""

    problem: str | None = None
    nodes: set[int] = field(default_factory=set)     # ids of the nodes on the way
    minus_inf: list[tuple[onnx.NodeProto, int, str]] = field(default_factory=list)


def _walk(x: str, idx: GraphIndex, float_inputs: set[str]) -> _Walk:
    """Why ``x`` may hold a non-finite value for finite activations, besides ``-inf``
    constants (which ``minus_inf`` lists as (reader, slot, name)); the nodes on the way."""
    found = _Walk()
    stack: list[tuple[str, onnx.NodeProto | None, int]] = [(x, None, 0)]
    seen: set[str] = set()
    while stack and found.problem is None:
        name, reader, slot = stack.pop()
        if name in seen or not name:
            continue
        seen.add(name)
        if len(seen) > _MAX_WALK:
            found.problem = (f"the softmax input's producers go back further than {_MAX_WALK} "
                             f"tensors")
            break
        value = idx.value(name)
        if value is not None:
            if _not_finite(value):
                if reader is None or not np.all(np.isfinite(value) | (value == -np.inf)):
                    found.problem = (f"constant '{name}' on the softmax input's path is NaN "
                                     f"or +inf")
                else:
                    found.minus_inf.append((reader, slot, name))
            continue
        if name in float_inputs:
            found.problem = (f"float graph input '{name}' reaches the softmax input (a mask "
                             f"supplied by the caller may hold -inf)")
            break
        node = idx.producer.get(name)
        if node is None or id(node) in found.nodes:
            continue  # an integer or bool graph input, or a node already walked
        found.nodes.add(id(node))
        found.problem = _node_problem(node, idx)
        if found.problem is not None or node.op_type in _SCORES or \
                node.op_type in _INDEX_OPS or \
                node.op_type == "Cast" and attr(node, "to") not in _FLOAT_TYPES:
            continue
        first = 1 if node.op_type == "Where" else 0
        stack.extend((n, node, i) for i, n in enumerate(node.input) if i >= first)
    return found


def _node_problem(node: onnx.NodeProto, idx: GraphIndex) -> str | None:
    label = f"{node.op_type} '{node.name or node.output[0]}'"
    if node.op_type in _SCORES and node.domain in (*ONNX_DOMAINS, "com.microsoft"):
        return None
    if node.domain not in ONNX_DOMAINS or (node.op_type not in _FINITE_OPS | _INDEX_OPS
                                            and node.op_type != "Div"):
        return f"{label} on the softmax input's path may make a finite value infinite"
    if node.op_type == "Div":
        divisor = idx.value(node.input[1])
        if divisor is None or _not_finite(divisor) or not np.all(divisor != 0):
            return (f"{label} on the softmax input's path divides by something that is not "
                    f"a non-zero constant")
    if node.op_type == "ConstantOfShape":
        fill = attr(node, "value")
        if fill is not None and _not_finite(numpy_helper.to_array(fill)):
            return f"{label} fills with a value that is not finite"
    return None


def _escapes(readers: list[onnx.NodeProto], inside: set[int], softmaxes: set[int],
             idx: GraphIndex) -> str | None:
    """Where a ``-inf`` mask value read by ``readers`` goes other than into the guarded
    softmaxes (through nodes on their inputs' paths), or None."""
    stack, seen = list(readers), set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for out in node.output:
            if out in idx.graph_outputs:
                return f"graph output '{out}'"
            for user in idx.consumers.get(out, ()):
                if id(user) in softmaxes:
                    continue
                if id(user) not in inside:
                    return f"{user.op_type} '{user.name or user.output[0]}'"
                stack.append(user)
    return None


@register
class DropNanGuard(Pass[NoConfig], name="drop-nan-guard", lossless=True):
    """Remove ``Where(IsNaN(s), 0, s)`` after a Softmax whose input is finite (a ``-inf``
    mask fill becomes ``finfo.min``); see the module docstring."""

    def __init__(self, config=None, **options):
        super().__init__(config, **options)
        self._masks: tuple[str, ...] = ()

    def compare_outputs(self, feed, reference, got):
        """Batch rows whose mask has no real token are left out (module doc, 3)."""
        keep = None
        for name in self._masks:
            mask = np.asarray(feed.get(name, ()))
            if mask.ndim >= 1 and mask.size:
                row = mask.reshape(mask.shape[0], -1).any(axis=1)
                keep = row if keep is None or keep.shape != row.shape else keep & row
        if keep is None or keep.all():
            return reference, got

        def rows(outputs):
            out = {}
            for name, value in outputs.items():
                value = np.asarray(value)
                if value.ndim and value.shape[0] == keep.shape[0]:
                    value = np.where(keep.reshape((-1,) + (1,) * (value.ndim - 1)), value,
                                     np.zeros((), value.dtype))
                out[name] = value
            return out

        return rows(reference), rows(got)

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        graph = model.graph
        idx = GraphIndex(graph, model.ir_version)
        float_inputs = {i.name for i in graph.input
                        if i.type.tensor_type.elem_type in _FLOAT_TYPES}
        plans: list[tuple[onnx.NodeProto, onnx.NodeProto, onnx.NodeProto, _Walk]] = []
        skipped: list[Skip] = []
        for node in graph.node:
            found = _guard(node, idx)
            if found is None:
                continue
            isnan, softmax = found
            if node.output[0] in idx.graph_outputs:
                skipped.append(Skip(site(node), "the guard's output is a graph output; "
                                    "kept so the name stays"))
                continue
            walk = _walk(softmax.input[0], idx, float_inputs)
            if walk.problem:
                skipped.append(Skip(site(node), f"kept: {walk.problem}"))
                continue
            plans.append((node, isnan, softmax, walk))
        inside = set().union(*(w.nodes for *_, w in plans)) if plans else set()
        softmaxes = {id(s) for _, _, s, _ in plans}
        kept = []
        for plan in plans:
            escape = _escapes([r for r, _, _ in plan[3].minus_inf], inside, softmaxes, idx)
            if escape:
                skipped.append(Skip(site(plan[0]), f"kept: the -inf mask fill also reaches "
                                    f"{escape}, which would see finfo.min instead"))
            else:
                kept.append(plan)
        counters = {"nan_guards_removed": len(kept), "mask_fills_made_finite": 0}
        if not kept:
            return PassResult(model, False, counters, skipped)
        mapping: dict[str, str] = {}
        gone: list[onnx.NodeProto] = []
        finite: dict[str, str] = {}
        taken = idx.all_names()
        for guard, isnan, _, walk in kept:
            mapping[guard.output[0]] = guard.input[2]
            gone.append(guard)
            if len(idx.consumers.get(isnan.output[0], ())) == 1 and \
                    isnan.output[0] not in idx.graph_outputs:
                gone.append(isnan)
            for reader, slot, name in walk.minus_inf:
                if name not in finite:
                    value = idx.value(name)
                    value = np.where(value == -np.inf, np.finfo(value.dtype).min, value)
                    finite[name] = unique_name(f"{name}/finite", taken)
                    taken.add(finite[name])
                    graph.initializer.append(numpy_helper.from_array(
                        value.astype(idx.value(name).dtype), finite[name]))
                reader.input[slot] = finite[name]
        counters["mask_fills_made_finite"] = len(finite)
        self._masks = _mask_inputs(model, idx) if finite else ()
        remove_nodes(graph, gone)
        for node in graph.node:
            rename_inputs(node, mapping)
        drop_value_info(graph, [o for n in gone for o in n.output])
        prune_orphans(graph, list(finite), model.ir_version)
        return PassResult(model, True, counters, skipped)


def _mask_inputs(model: onnx.ModelProto, idx: GraphIndex) -> tuple[str, ...]:
    """The integer and bool graph inputs other than token ids: where an all-padding row
    shows (the token analysis' mask when it finds one)."""
    from graphopt.analysis.tokens import analyze_tokens

    try:
        found = analyze_tokens(model)
    except Exception:  # noqa: BLE001 - then every non-float input counts as a mask
        found = None
    if found is not None and not isinstance(found, str):
        return (found.mask,)
    return tuple(i.name for i in model.graph.input
                 if i.type.tensor_type.elem_type not in _FLOAT_TYPES and "mask" in i.name)
