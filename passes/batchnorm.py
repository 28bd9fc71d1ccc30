"""``fold-batchnorm``: BatchNormalization folded into the layer that feeds it.

Inference-mode BatchNormalization is an affine map per channel, ``y = x * s + t`` with
``s = scale / sqrt(var + eps)`` and ``t = B - mean * s``; the layer before it is linear in
its weight, so the map moves into the weight and bias. The BN node disappears and the
layer's output takes the BN's output name.

1. ``Conv``: weight ``[C_out, C_in/group, k...]`` scaled along axis 0; the bias becomes
   ``b * s + t`` (created if absent).
2. ``ConvTranspose``: weight ``[C_in, C_out/group, k...]``; output channel ``o`` of group ``g``
   is column ``o - g * C_out/group`` of that group's block, so the scale is laid out per group.
3. ``Gemm``: BN over a 2-D output scales its columns: ``B`` (``[K, N]``, or ``[N, K]`` with
   ``transB=1``) per output column; ``C`` becomes ``beta * C * s + t`` and ``beta`` 1.
4. ``MatMul`` with a constant 2-D weight and a 2-D output (BN's channel axis 1 is then the
   weight's column axis): columns of ``W`` are scaled; the bias goes into the ``Add`` that
   follows the MatMul (``MatMul -> Add(const) -> BN``) or into a new ``Add``.
5. Folded only when every tensor between the layer and the BN has that one reader and is not
   a graph output, and weights (initializers or ``Constant`` nodes) are constant.
   Shared weights are copied, not changed. Anything else is a skip with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from graphopt.core.contract import Context, NoConfig, Pass, PassResult, Skip
from graphopt.core.registry import register

from graphopt.ir.graph import (
    ONNX_DOMAINS,
    GraphIndex,
    attr,
    drop_value_info,
    ir3_inputs_kept,
    prune_orphans,
    replace_nodes,
    set_attr,
    shape_skeleton,
    site,
    unique_name,
)

_TARGETS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class _Plan:
    bn: onnx.NodeProto
    layer: onnx.NodeProto
    kind: str                      # the layer's op type
    s: np.ndarray                  # per-channel scale (float64)
    t: np.ndarray                  # per-channel shift (float64)
    add: onnx.NodeProto | None = None   # MatMul -> Add(bias) -> BN
    add_bias_pos: int = 1


@register
class FoldBatchNorm(Pass[NoConfig], name="fold-batchnorm", lossless=True):
    """Fold inference-mode BatchNormalization into a preceding Conv, ConvTranspose, Gemm or
    MatMul; see the module docstring for the numbered cases."""
    # The folded weights round once where the original rounded twice (float32).
    atol = 1e-4
    rtol = 1e-3

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        graph = model.graph
        idx = GraphIndex(graph, model.ir_version)
        ranks = _Ranks(model, ctx)
        plans: list[_Plan] = []
        skipped: list[Skip] = []
        for node in graph.node:
            if node.op_type != "BatchNormalization" or node.domain not in ONNX_DOMAINS:
                continue
            plan = _plan(node, idx, ranks)
            if isinstance(plan, str):
                skipped.append(Skip(site(node), plan))
            else:
                plans.append(plan)
        counters = {"batchnorms_folded": 0, "bias_adds_created": 0}
        if not plans:
            return PassResult(model, False, counters, skipped)
        with ir3_inputs_kept(model):
            taken = idx.all_names()
            replacements: dict[int, list[onnx.NodeProto]] = {}
            orphans: list[str] = []
            for plan in plans:
                replacement = _apply(plan, idx, taken, orphans)
                replacements[id(plan.bn)] = replacement
                counters["batchnorms_folded"] += 1
                counters["bias_adds_created"] += len(replacement)
            replace_nodes(graph, replacements)
            prune_orphans(graph, orphans, model.ir_version)
        return PassResult(model, True, counters, skipped)


class _Ranks:
    """Tensor ranks, from shape inference run once and only if a MatMul needs one."""

    def __init__(self, model: onnx.ModelProto, ctx: Context):
        self._model, self._ctx = model, ctx
        self._shapes: dict | None = None

    def __call__(self, name: str) -> int | None:
        if self._shapes is None:
            self._shapes = self._infer()
        return self._shapes.get(name)

    def _infer(self) -> dict[str, int]:
        from graphopt.analysis.shapes import infer_shapes

        # onnx's own inference: ranks are all this needs, and it is much cheaper to start
        # than onnxruntime's symbolic inference.
        work = infer_shapes(shape_skeleton(self._model), self._ctx.input_shapes, symbolic=False)
        ranks = {}
        for vi in list(work.graph.input) + list(work.graph.value_info) + list(work.graph.output):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
                ranks[vi.name] = len(vi.type.tensor_type.shape.dim)
        return ranks


def _affine(bn: onnx.NodeProto, idx: GraphIndex) -> tuple[np.ndarray, np.ndarray] | str:
    """(s, t) with BN(x) = x * s + t per channel, or why BN is not an inference-mode affine."""
    if attr(bn, "training_mode", 0):
        return "training_mode=1"
    if not attr(bn, "spatial", 1):
        return "spatial=0 (per-element statistics) is not supported"
    extra = [o for o in bn.output[1:] if o and idx.uses(o)]
    if extra:
        return f"training outputs are used ('{extra[0]}')"
    params = []
    for role, name in zip(("scale", "B", "mean", "var"), bn.input[1:5]):
        value = idx.value(name)
        if value is None:
            return f"its {role} input '{name}' {idx.not_constant(name)}"
        params.append(value.astype(np.float64).reshape(-1))
    scale, bias, mean, var = params
    if len({p.size for p in params}) != 1:
        return "its scale, B, mean and var have different lengths"
    s = scale / np.sqrt(var + float(attr(bn, "epsilon", 1e-5)))
    return s, bias - mean * s


def _single_reader(idx: GraphIndex, name: str, reader: onnx.NodeProto) -> str | None:
    if name in idx.graph_outputs:
        return f"'{name}' is also a graph output"
    readers = idx.consumers.get(name, [])
    if len(readers) != 1 or readers[0] is not reader:
        return f"'{name}' has {len(readers)} readers; folding would change the others"
    return None


def _weight(idx: GraphIndex, node: onnx.NodeProto) -> np.ndarray | str:
    value = idx.value(node.input[1])
    if value is None:
        return f"{node.op_type} weight '{node.input[1]}' {idx.not_constant(node.input[1])}"
    return value


def _plan(bn: onnx.NodeProto, idx: GraphIndex, ranks: Callable[[str], int | None]
          ) -> _Plan | str:
    affine = _affine(bn, idx)
    if isinstance(affine, str):
        return affine
    s, t = affine
    x = bn.input[0]
    producer = idx.producer.get(x)
    if producer is None:
        return f"input '{x}' is not produced by a node"
    reason = _single_reader(idx, x, bn)
    if reason:
        return reason
    add = None
    add_pos = 1
    if (producer.op_type == "Add" and producer.domain in ONNX_DOMAINS
            and len(producer.input) == 2):
        # MatMul -> Add(constant bias) -> BN: the bias goes through the fold too.
        for pos in (0, 1):
            other = idx.producer.get(producer.input[pos])
            if (other is not None and other.op_type == "MatMul"
                    and idx.is_constant(producer.input[1 - pos])):
                add, add_pos, producer = producer, 1 - pos, other
                reason = _single_reader(idx, add.input[pos], add)
                if reason:
                    return reason
                break
    if producer.op_type not in _TARGETS or producer.domain not in ONNX_DOMAINS:
        return (f"input is produced by {producer.op_type}, not by Conv, ConvTranspose, Gemm "
                "or MatMul")
    weight = _weight(idx, producer)
    if isinstance(weight, str):
        return weight
    kind = producer.op_type
    channels = s.size
    if kind in ("Conv", "ConvTranspose"):
        out = weight.shape[0] if kind == "Conv" else weight.shape[1] * attr(producer, "group", 1)
        if len(producer.input) > 2 and producer.input[2] and not idx.is_constant(producer.input[2]):
            bias = producer.input[2]
            return f"{kind} bias '{bias}' {idx.not_constant(bias)}"
    elif kind == "Gemm":
        out = weight.shape[0] if attr(producer, "transB", 0) else weight.shape[1]
        if len(producer.input) > 2 and producer.input[2] and not idx.is_constant(producer.input[2]):
            return f"Gemm C input '{producer.input[2]}' {idx.not_constant(producer.input[2])}"
    else:
        if weight.ndim != 2:
            return f"MatMul weight (second input) has rank {weight.ndim}, not 2"
        rank = ranks(x)
        if rank != 2:
            return (f"MatMul output has rank {rank if rank is not None else 'unknown'}; "
                    "BatchNormalization's channel axis 1 is the weight's column axis only "
                    "for rank 2")
        out = weight.shape[1]
    if out != channels:
        return f"{kind} has {out} output channels but BatchNormalization has {channels}"
    return _Plan(bn, producer, kind, s, t, add, add_pos)


def _put(idx: GraphIndex, node: onnx.NodeProto, pos: int, value: np.ndarray, base: str,
         taken: set[str], orphans: list[str]) -> None:
    """Make ``node.input[pos]`` hold ``value``: in place if nothing else reads the old
    tensor, else as a new initializer (the old one is pruned if it ends up unread)."""
    old = node.input[pos] if len(node.input) > pos else ""
    if old and idx.uses(old) == 1:
        if idx.is_initializer(old):
            idx.initializers[old].CopyFrom(numpy_helper.from_array(value, old))
            return
        if old in idx.constant_nodes:
            const = idx.constant_nodes[old]
            del const.attribute[:]
            const.attribute.append(
                onnx.helper.make_attribute("value", numpy_helper.from_array(value, old)))
            return
    name = unique_name(base, taken)
    idx.graph.initializer.append(numpy_helper.from_array(value, name))
    while len(node.input) < pos:
        node.input.append("")
    if len(node.input) > pos:
        node.input[pos] = name
    else:
        node.input.append(name)
    if old:
        orphans.append(old)


def _apply(plan: _Plan, idx: GraphIndex, taken: set[str], orphans: list[str]
           ) -> list[onnx.NodeProto]:
    """Rewrite the layer; returns what replaces the BN node (nothing, or a new bias Add)."""
    layer, s, t = plan.layer, plan.s, plan.t
    orphans.extend(plan.bn.input[1:])
    w_name = layer.input[1]
    w = idx.value(w_name)
    dtype = w.dtype
    w64 = w.astype(np.float64)
    if plan.kind == "Conv":
        w64 = w64 * s.reshape((-1,) + (1,) * (w.ndim - 1))
    elif plan.kind == "ConvTranspose":
        g = attr(layer, "group", 1)
        blocks = w64.reshape((g, w.shape[0] // g, w.shape[1]) + w.shape[2:])
        w64 = (blocks * s.reshape((g, 1, w.shape[1]) + (1,) * (w.ndim - 2))).reshape(w.shape)
    elif plan.kind == "Gemm":
        w64 = w64 * (s[:, None] if attr(layer, "transB", 0) else s[None, :])
    else:
        w64 = w64 * s[None, :]
    _put(idx, layer, 1, w64.astype(dtype), f"{w_name}_bnfolded", taken, orphans)

    y = plan.bn.output[0]
    bias_base = f"{plan.bn.name or y}_bias"
    if plan.kind in ("Conv", "ConvTranspose", "Gemm"):
        has_bias = len(layer.input) > 2 and layer.input[2]
        bias = idx.value(layer.input[2]).astype(np.float64) if has_bias else np.zeros(())
        if plan.kind == "Gemm":
            bias = bias * float(attr(layer, "beta", 1.0))
            set_attr(layer, "beta", 1.0)
        new_bias = (bias * s + t) if has_bias else t
        _put(idx, layer, 2, new_bias.astype(dtype), bias_base, taken, orphans)
        _rename_output(idx, layer, plan.bn.input[0], y)
        return []
    if plan.add is not None:
        pos = plan.add_bias_pos
        bias = idx.value(plan.add.input[pos]).astype(np.float64)
        _put(idx, plan.add, pos, (bias * s + t).astype(dtype), bias_base, taken, orphans)
        _rename_output(idx, plan.add, plan.bn.input[0], y)
        return []
    name = unique_name(bias_base, taken)
    idx.graph.initializer.append(numpy_helper.from_array(t.astype(dtype), name))
    add = onnx.helper.make_node("Add", [plan.bn.input[0], name], [y],
                                name=unique_name(f"{plan.bn.name or y}_add", taken))
    return [add]


def _rename_output(idx: GraphIndex, node: onnx.NodeProto, old: str, new: str) -> None:
    for i, out in enumerate(node.output):
        if out == old:
            node.output[i] = new
    drop_value_info(idx.graph, [old])
