"""Coupling handlers for layout ops (Concat, Split, Slice, Transpose), pooling, reductions,
Resize and Pad, with their rewriters (offsets, sizes and shape constants that change when
indices go). The Reshape family, Expand and Tile live in ``graphopt.analysis.ops.reshape``.
"""

from __future__ import annotations

import numpy as np

from graphopt.analysis.registry import NodeView, axis_index, handles, rewrites
from graphopt.analysis.view import HandlerError


# =========================================================================== layout


@handles("Concat")
def _concat(nv: NodeView) -> None:
    out = nv.out_shape(0)
    axis = axis_index(nv.attr("axis"), len(out))
    offset = 0
    for i in range(len(nv.node.input)):
        s = nv.in_shape(i)
        for k, d in enumerate(s):
            if k == axis:
                nv.link(nv.inp(i, k), nv.out(0, k), np.arange(d), offset + np.arange(d))
            else:
                nv.link(nv.inp(i, k), nv.out(0, k), d)
        offset += s[axis]


@handles("Split")
def _split(nv: NodeView) -> None:
    x = nv.in_shape(0)
    axis = axis_index(nv.attr("axis", 0), len(x))
    offset = 0
    for o in range(len(nv.node.output)):
        s = nv.out_shape(o)
        for k, d in enumerate(s):
            if k == axis:
                nv.link(nv.inp(0, k), nv.out(o, k), offset + np.arange(d), np.arange(d))
            else:
                nv.link(nv.inp(0, k), nv.out(o, k), d)
        offset += s[axis]
    if nv.has_in(1):
        nv.free(nv.inp(1, 0))


@rewrites("Split")
def _split_rewrite(nv: NodeView, ed) -> None:
    x = nv.in_shape(0)
    axis = axis_index(nv.attr("axis", 0), len(x))
    sizes = []
    changed = False
    for o in range(len(nv.node.output)):
        d = nv.out_shape(o)[axis]
        r = len(ed.removed(nv.out(o, axis)))
        changed |= r > 0
        sizes.append(d - r)
    if not changed:
        return
    sizes_arr = np.array(sizes, dtype=np.int64)
    if nv.opset() < 13:
        ed.set_attr(nv.idx, "split", sizes)
    else:
        ed.remove_attr(nv.idx, "num_outputs")
        ed.set_input(nv.idx, 1, sizes_arr)


def _slice_params(nv: NodeView, rank: int):
    """(starts, ends, axes, steps) as int arrays, or None where not constant."""
    if nv.opset() < 10:
        starts, ends = nv.attr("starts"), nv.attr("ends")
        axes = nv.attr("axes", list(range(len(starts))))
        return (np.array(starts), np.array(ends), np.array(axes), np.ones(len(starts), int))
    starts, ends = nv.const_in(1), nv.const_in(2)
    axes = nv.const_in(3) if nv.has_in(3) else None
    steps = nv.const_in(4) if nv.has_in(4) else None
    if nv.has_in(3) and axes is None:
        return None
    if axes is None:
        axes = np.arange(len(starts) if starts is not None else nv.in_shape(1)[0])
    if steps is None and not nv.has_in(4) and starts is not None:
        steps = np.ones(len(starts), dtype=np.int64)
    return starts, ends, np.array([axis_index(int(a), rank) for a in axes]), steps


def _norm_bound(v: int, d: int) -> int:
    v = int(v)
    if v < 0:
        v += d
    return min(max(v, 0), d)


@handles("Slice")
def _slice(nv: NodeView) -> None:
    x = nv.in_shape(0)
    params = _slice_params(nv, len(x))
    if params is None:
        raise HandlerError(f"{nv.label} slices axes computed at runtime")
    starts, ends, axes, steps = params
    sliced = {int(a): k for k, a in enumerate(axes)}
    for k, d in enumerate(x):
        if k not in sliced:
            nv.link(nv.inp(0, k), nv.out(0, k), d)
            continue
        j = sliced[k]
        if starts is None or ends is None or steps is None:
            reason = f"{nv.label} slices axis {k} with bounds computed at runtime"
            nv.block(nv.inp(0, k), reason)
            nv.block(nv.out(0, k), reason)
            continue
        if int(steps[j]) != 1:
            reason = f"{nv.label} slices axis {k} with step {int(steps[j])}"
            nv.block(nv.inp(0, k), reason)
            nv.block(nv.out(0, k), reason)
            continue
        s, e = _norm_bound(starts[j], d), _norm_bound(ends[j], d)
        n = max(e - s, 0)
        nv.link(nv.inp(0, k), nv.out(0, k), s + np.arange(n), np.arange(n))


@rewrites("Slice")
def _slice_rewrite(nv: NodeView, ed) -> None:
    x = nv.in_shape(0)
    starts, ends, axes, _ = _slice_params(nv, len(x))
    new_starts = np.array(starts, dtype=np.int64).copy()
    new_ends = np.array(ends, dtype=np.int64).copy()
    changed = False
    for j, k in enumerate(axes):
        removed = ed.removed(nv.inp(0, int(k)))
        if not len(removed):
            continue
        d = x[int(k)]
        s, e = _norm_bound(starts[j], d), _norm_bound(ends[j], d)
        new_starts[j] = s - np.searchsorted(removed, s)
        new_ends[j] = e - np.searchsorted(removed, e)
        changed = True
    if not changed:
        return
    if nv.opset() < 10:
        ed.set_attr(nv.idx, "starts", [int(v) for v in new_starts])
        ed.set_attr(nv.idx, "ends", [int(v) for v in new_ends])
    else:
        ed.set_input(nv.idx, 1, new_starts.astype(nv.const_in(1).dtype))
        ed.set_input(nv.idx, 2, new_ends.astype(nv.const_in(2).dtype))


@handles("Transpose")
def _transpose(nv: NodeView) -> None:
    x = nv.in_shape(0)
    perm = nv.attr("perm", list(range(len(x)))[::-1])
    for k, p in enumerate(perm):
        nv.link(nv.out(0, k), nv.inp(0, int(p)), x[int(p)])


# =========================================================================== pooling, reduce


@handles("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
         "GlobalLpPool")
def _pool(nv: NodeView) -> None:
    x = nv.in_shape(0)
    nv.link(nv.inp(0, 0), nv.out(0, 0), x[0])
    indices = nv.node.output[1] if nv.has_out(1) else None
    if indices and (nv.view.consumers.get(indices) or indices in nv.view.graph_outputs):
        nv.block(nv.inp(0, 1), f"{nv.label} returns indices that count channels")
    else:
        nv.link(nv.inp(0, 1), nv.out(0, 1), x[1])


_REDUCE = ["ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
           "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"]


@handles(*_REDUCE, "ArgMax", "ArgMin")
def _reduce(nv: NodeView) -> None:
    x = nv.in_shape(0)
    keep = nv.attr("keepdims", 1)
    if nv.op in ("ArgMax", "ArgMin"):
        axes = [nv.attr("axis", 0)]
    else:
        from_input = nv.opset() >= (13 if nv.op == "ReduceSum" else 18)
        if from_input:
            if nv.has_in(1):
                value = nv.const_in(1)
                if value is None:
                    raise HandlerError(f"{nv.label} reduces over axes computed at runtime")
                axes = [int(v) for v in np.atleast_1d(value)]
                nv.free(nv.inp(1, 0))
            else:
                axes = []
        else:
            axes = list(nv.attr("axes", []) or [])
        if not axes and not nv.attr("noop_with_empty_axes", 0):
            axes = list(range(len(x)))
    axes = sorted({axis_index(int(a), len(x)) for a in axes})
    for k, d in enumerate(x):
        if k in axes:
            nv.block(nv.inp(0, k), f"{nv.label} reduces over axis {k}")
            if keep:
                nv.block(nv.out(0, k), f"{nv.label} reduces over axis {k}")
        else:
            ok = k if keep else k - sum(a < k for a in axes)
            nv.link(nv.inp(0, k), nv.out(0, ok), d)


def _keep_axes(nv: NodeView, same: list[bool], verb: str) -> None:
    """Input 0's axis k passes to output 0's axis k where ``same[k]``; the op ``verb`` the
    other axes (resizes, pads), which block both sides."""
    for k, d in enumerate(nv.in_shape(0)):
        if same[k]:
            nv.link(nv.inp(0, k), nv.out(0, k), d)
        else:
            reason = f"{nv.label} {verb} axis {k}"
            nv.block(nv.inp(0, k), reason)
            nv.block(nv.out(0, k), reason)


@handles("Resize", "Upsample")
def _resize(nv: NodeView) -> None:
    x, y = nv.in_shape(0), nv.out_shape(0)
    _keep_axes(nv, [d == y[k] for k, d in enumerate(x)], "resizes")
    for i in range(1, len(nv.node.input)):
        if nv.has_in(i):
            nv.free(nv.inp(i, 0))


@rewrites("Resize")
def _resize_rewrite(nv: NodeView, ed) -> None:
    if len(nv.node.input) < 4 or not nv.has_in(3):
        return
    sizes = nv.const_in(3)
    if sizes is None:
        return
    y = nv.out_shape(0)
    axes = nv.attr("axes", None) or list(range(len(y)))
    new = np.array(sizes, dtype=np.int64).copy()
    changed = False
    for j, k in enumerate(axes):
        k = axis_index(int(k), len(y))
        r = len(ed.removed(nv.out(0, k)))
        if r:
            new[j] = y[k] - r
            changed = True
    if changed:
        ed.set_input(nv.idx, 3, new.astype(sizes.dtype))


@handles("Pad")
def _pad(nv: NodeView) -> None:
    x = nv.in_shape(0)
    rank = len(x)
    if nv.opset() < 11:
        pads = np.array(nv.attr("pads", nv.attr("paddings", [0] * 2 * rank)))
    else:
        pads = nv.const_in(1)
        if pads is None:
            raise HandlerError(f"{nv.label} pads by amounts computed at runtime")
    axes = list(range(rank))
    if nv.has_in(3):
        value = nv.const_in(3)
        if value is None:
            raise HandlerError(f"{nv.label} pads axes computed at runtime")
        axes = [axis_index(int(a), rank) for a in value]
    n = len(axes)
    amount = {a: (int(pads[j]), int(pads[j + n])) for j, a in enumerate(axes)}
    _keep_axes(nv, [amount.get(k, (0, 0)) == (0, 0) for k in range(rank)], "pads")
    for i in range(1, len(nv.node.input)):
        if nv.has_in(i):
            nv.free_input(i)
