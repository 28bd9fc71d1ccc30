"""``fold-pad``: constant Pads folded into the Conv or pooling op that reads them.

1. A Pad whose pads are all zero is a no-op and is removed (any mode); when its output is a
   graph output the producer's output takes that name (see ``cleanup.remove_passthrough``).
2. A constant-mode Pad with non-negative pads on the spatial axes only (batch and channel
   axes unpadded) whose single reader is one of these ops, with ``auto_pad`` NOTSET, is folded
   into that op's ``pads`` (added to what it already has):
   - ``Conv``, when the pad value is 0 (Conv's own padding is zeros);
   - ``AveragePool``, when the pad value is 0 and ``count_include_pad=1`` (otherwise the
     folded zeros would leave the divisor);
   - ``LpPool``, when the pad value is 0 (zeros add nothing to the p-norm either way);
   - ``MaxPool``, when the pad value is -inf, or when it is <= 0 and the padded tensor is
     known non-negative (it comes from Relu, Sigmoid, Softplus, Abs, Exp, Softmax, or Clip
     with a min >= 0), so a padded element never wins the max over a window that holds an
     input element; and the ``Indices`` output unused (its flat indices would count the
     padding).
   Pooling ops also need the combined pads to stay below the kernel size (onnxruntime's
   rule for pooling pads), and, for every input size the model accepts, the same number of
   windows before and after the fold (``ceil_mode``) and, for MaxPool, no window that covers
   padding alone (a dilated kernel over a small input): ``pad_legality`` checks every
   length a dynamic axis may take, from 1 up, and the one length of a static axis (static
   as proven from the model's inputs, never from its declared ``value_info``).
3. Pad takes ``pads``, ``constant_value`` and ``axes`` as inputs from opset 11 (they must be
   constant) and as attributes before; both forms are read.
4. Chains (Pad -> Pad -> Conv) fold over repeated rounds. Anything else is a skip with the
   reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx

from graphopt.core.contract import Context, NoConfig, Pass, PassResult, Skip
from graphopt.core.registry import register

from graphopt.ir.graph import (
    ONNX_DOMAINS,
    GraphIndex,
    attr,
    ir3_inputs_kept,
    prune_orphans,
    remove_nodes,
    remove_passthrough,
    set_attr,
    site,
)
from graphopt.passes.pad_legality import Axis, axis_blocker

_NONNEGATIVE = {"Relu", "Sigmoid", "Softplus", "Abs", "Exp", "Softmax"}


@dataclass
class _PadSpec:
    pads: list[int]            # [begin..., end...] over `axes`, or over all axes if axes is None
    axes: list[int] | None
    value: float
    mode: str

    def full(self, rank: int) -> tuple[list[int], list[int]] | str:
        """Begins and ends for every axis of a rank-``rank`` tensor."""
        k = len(self.pads) // 2
        axes = self.axes if self.axes is not None else list(range(k))
        axes = [a + rank if a < 0 else a for a in axes]
        if (self.axes is None and k != rank) or not all(0 <= a < rank for a in axes):
            return f"its pads do not fit the input's rank {rank}"
        begins, ends = [0] * rank, [0] * rank
        for i, axis in enumerate(axes):
            begins[axis], ends[axis] = self.pads[i], self.pads[k + i]
        return begins, ends


@register
class FoldPad(Pass[NoConfig], name="fold-pad", lossless=True):
    """Fold constant Pads into the following Conv/AveragePool/MaxPool and remove no-op Pads;
    see the module docstring for the numbered cases."""

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        graph = model.graph
        counters = {"pads_folded": 0, "noop_pads_removed": 0}
        skipped: list[Skip] = []
        with ir3_inputs_kept(model):
            while True:
                skipped = []
                counters["noop_pads_removed"] += _remove_noops(graph, model.ir_version, skipped)
                folded = _fold_round(model, skipped)
                counters["pads_folded"] += folded
                if not folded:
                    break
        return PassResult(model, any(counters.values()), counters, skipped)


def _pad_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    return [n for n in graph.node if n.op_type == "Pad" and n.domain in ONNX_DOMAINS]


def _read(node: onnx.NodeProto, idx: GraphIndex) -> _PadSpec | str:
    mode = attr(node, "mode", "constant")
    if len(node.input) >= 2:  # opset >= 11: pads, constant_value, axes are inputs
        value = idx.value(node.input[1]) if node.input[1] else None
        if value is None:
            return f"pads input '{node.input[1]}' {idx.not_constant(node.input[1])}"
        pads = [int(p) for p in np.asarray(value).reshape(-1)]
        fill = 0.0
        if len(node.input) > 2 and node.input[2]:
            fill_value = idx.value(node.input[2])
            if fill_value is None:
                return f"constant_value input '{node.input[2]}' {idx.not_constant(node.input[2])}"
            fill = float(np.asarray(fill_value).reshape(-1)[0])
        axes = None
        if len(node.input) > 3 and node.input[3]:
            axes_value = idx.value(node.input[3])
            if axes_value is None:
                return f"axes input '{node.input[3]}' {idx.not_constant(node.input[3])}"
            axes = [int(a) for a in np.asarray(axes_value).reshape(-1)]
    else:
        pads = list(attr(node, "pads", attr(node, "paddings", [])))
        fill = float(attr(node, "value", 0.0))
        axes = None
    if len(pads) % 2 or (axes is not None and len(pads) != 2 * len(axes)):
        return f"its {len(pads)} pads do not match the padded axes"
    return _PadSpec(pads, axes, fill, mode)


def _remove_noops(graph: onnx.GraphProto, ir_version: int, skipped: list[Skip]) -> int:
    idx = GraphIndex(graph, ir_version)
    noops = []
    for node in _pad_nodes(graph):
        spec = _read(node, idx)
        if isinstance(spec, _PadSpec) and not any(spec.pads):
            noops.append(node)
    if not noops:
        return 0
    inputs = [name for node in noops for name in node.input[1:]]
    removed, kept = remove_passthrough(graph, noops)
    skipped.extend(Skip(site(n), f"no-op Pad kept: {reason}") for n, reason in kept)
    prune_orphans(graph, inputs, ir_version)
    return len(removed)


def _fold_round(model: onnx.ModelProto, skipped: list[Skip]) -> int:
    from graphopt.analysis.facts import proven_shapes

    graph, ir_version = model.graph, model.ir_version
    idx = GraphIndex(graph, ir_version)
    plans = []
    shapes = None
    for node in _pad_nodes(graph):
        if shapes is None:
            shapes = proven_shapes(model)
        plan = _plan(node, idx, shapes)
        if plan is None:
            continue
        if isinstance(plan, str):
            skipped.append(Skip(site(node), plan))
        else:
            plans.append(plan)
    if not plans:
        return 0
    orphans = []
    for pad, reader, new_pads in plans:
        reader.input[0] = pad.input[0]
        set_attr(reader, "pads", new_pads)
        orphans.extend(pad.input[1:])
    remove_nodes(graph, [pad for pad, _, _ in plans])
    prune_orphans(graph, orphans, ir_version)
    return len(plans)


def _rank(reader: onnx.NodeProto, idx: GraphIndex) -> int | None:
    kernel = attr(reader, "kernel_shape")
    if kernel:
        return len(kernel) + 2
    if reader.op_type == "Conv" and len(reader.input) > 1:
        weight = idx.value(reader.input[1])
        if weight is not None:
            return weight.ndim
    return None


def _nonnegative(name: str, idx: GraphIndex) -> bool:
    producer = idx.producer.get(name)
    if producer is None or producer.domain not in ONNX_DOMAINS:
        return False
    if producer.op_type in _NONNEGATIVE:
        return True
    if producer.op_type == "Clip":
        low = attr(producer, "min")
        if len(producer.input) > 1 and producer.input[1]:
            value = idx.value(producer.input[1])
            low = None if value is None else float(np.asarray(value).reshape(-1)[0])
        return low is not None and low >= 0
    return False


def _plan(pad: onnx.NodeProto, idx: GraphIndex, shapes: dict
          ) -> tuple[onnx.NodeProto, onnx.NodeProto, list[int]] | str | None:
    """(pad, reader, reader's new pads), or why not, or None for a no-op Pad that had to
    stay (already reported)."""
    spec = _read(pad, idx)
    if isinstance(spec, str):
        return spec
    if not any(spec.pads):
        return None
    if any(p < 0 for p in spec.pads):
        return "negative pads crop the input; they cannot fold into a Conv or pool"
    if spec.mode != "constant":
        return f"mode '{spec.mode}' is not constant padding"
    out = pad.output[0]
    if out in idx.graph_outputs:
        return f"its output '{out}' is a graph output"
    readers = idx.consumers.get(out, [])
    if len(readers) != 1:
        return f"its output has {len(readers)} readers; folding needs exactly one"
    reader = readers[0]
    if (reader.domain not in ONNX_DOMAINS
            or reader.op_type not in ("Conv", "AveragePool", "MaxPool", "LpPool")):
        return f"it feeds {reader.op_type}, which cannot absorb padding"
    if list(reader.input).count(out) != 1 or reader.input[0] != out:
        return f"it feeds {reader.op_type} through an input other than the data input"
    if attr(reader, "auto_pad", "NOTSET") != "NOTSET":
        return f"{reader.op_type} has auto_pad={attr(reader, 'auto_pad')}, not NOTSET"
    rank = _rank(reader, idx)
    if rank is None:
        return f"the rank of {reader.op_type}'s input is unknown"
    full = spec.full(rank)
    if isinstance(full, str):
        return full
    begins, ends = full
    if any(begins[:2]) or any(ends[:2]):
        return "it pads the batch or channel axis"
    reason = _value_blocker(pad, reader, spec.value, idx)
    if reason:
        return reason
    spatial = rank - 2
    old = list(attr(reader, "pads", [0] * (2 * spatial)))
    new = [old[i] + begins[2 + i] for i in range(spatial)]
    new += [old[spatial + i] + ends[2 + i] for i in range(spatial)]
    if reader.op_type != "Conv":
        kernel = list(attr(reader, "kernel_shape"))
        if any(new[i] >= kernel[i] or new[spatial + i] >= kernel[i] for i in range(spatial)):
            return (f"combined pads {new} would reach the kernel size {kernel}, which "
                    f"{reader.op_type} does not allow")
        reason = _window_blocker(reader, begins, ends, old, shapes.get(pad.input[0]))
        if reason:
            return reason
    return pad, reader, new


def _window_blocker(reader: onnx.NodeProto, begins: list[int], ends: list[int],
                    old: list[int], dims) -> str | None:
    """Why the fold would change some window of ``reader`` at some accepted input size."""
    kernel = list(attr(reader, "kernel_shape"))
    spatial = len(kernel)
    strides = list(attr(reader, "strides", [1] * spatial))
    dilations = list(attr(reader, "dilations", [1] * spatial))
    ceil_mode = bool(attr(reader, "ceil_mode", 0))
    for i in range(spatial):
        static = None
        if dims is not None and len(dims) == spatial + 2 and dims[2 + i]:
            static = int(dims[2 + i])
        axis = Axis(kernel[i], strides[i], dilations[i], (old[i], old[spatial + i]),
                    (begins[2 + i], ends[2 + i]))
        reason = axis_blocker(axis, reader.op_type, ceil_mode, static)
        if reason:
            where = "static" if static is not None else "dynamic"
            return f"spatial axis {2 + i} ({where}): {reason}"
    return None


def _value_blocker(pad: onnx.NodeProto, reader: onnx.NodeProto, value: float,
                   idx: GraphIndex) -> str | None:
    op = reader.op_type
    if op == "Conv":
        return None if value == 0 else f"pad value {value:g} is not 0, Conv pads with zeros"
    if op in ("AveragePool", "LpPool"):
        if value != 0:
            return f"pad value {value:g} is not 0"
        if op == "AveragePool" and not attr(reader, "count_include_pad", 0):
            return ("AveragePool has count_include_pad=0; padded zeros would leave the "
                    "divisor")
        return None
    if len(reader.output) > 1 and reader.output[1] and idx.uses(reader.output[1]):
        return "MaxPool's Indices output is used; the indices would no longer count the padding"
    if math.isinf(value) and value < 0:
        return None
    if value <= 0 and _nonnegative(pad.input[0], idx):
        return None
    return (f"pad value {value:g} can win MaxPool's max (it is not -inf and the input is not "
            "known non-negative)")
