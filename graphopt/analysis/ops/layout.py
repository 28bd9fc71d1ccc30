"""Coupling handlers for layout ops (Concat, Split, Slice, Transpose, Reshape family,
Expand, Tile, ConstantOfShape), pooling, reductions, Resize and Pad, with their rewriters
(offsets, sizes and shape constants that change when indices go).
"""

from __future__ import annotations

import logging

import numpy as np

from graphopt.analysis.view import GraphView, HandlerError
from graphopt.analysis.registry import NodeView, axis_index, handles, rewrites

logger = logging.getLogger(__name__)


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


def reshape_groups(a: tuple[int, ...], b: tuple[int, ...]):
    """Pair runs of axes of shape ``a`` and ``b`` with equal products (size-1 axes aside).

    Returns a list of (axes of a, axes of b) or None when the shapes do not factor.
    """
    ia = [k for k, d in enumerate(a) if d != 1]
    ib = [k for k, d in enumerate(b) if d != 1]
    groups = []
    i = j = 0
    while i < len(ia) and j < len(ib):
        ga, gb = [ia[i]], [ib[j]]
        pa, pb = a[ia[i]], b[ib[j]]
        i += 1
        j += 1
        while pa != pb:
            if pa < pb:
                if i >= len(ia):
                    return None
                ga.append(ia[i])
                pa *= a[ia[i]]
                i += 1
            else:
                if j >= len(ib):
                    return None
                gb.append(ib[j])
                pb *= b[ib[j]]
                j += 1
        groups.append((ga, gb))
    if i < len(ia) or j < len(ib):
        return None
    return groups


@handles("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def _reshape(nv: NodeView) -> None:
    """An axis kept whole maps one-to-one; an axis split into several (hidden -> heads x
    head_dim, C -> groups x C/g) couples with the outermost part, so a unit is a block of
    consecutive indices; axes merged into one (C, H, W -> C*H*W) couple through the
    outermost merged axis, each of its indices owning a block of the merged axis."""
    a, b = nv.in_shape(0), nv.out_shape(0)
    for i in range(1, len(nv.node.input)):
        if nv.has_in(i):
            for k in range(len(nv.in_shape(i))):
                nv.free(nv.inp(i, k))
    for k, d in enumerate(a):
        if d == 1:
            nv.free(nv.inp(0, k))
    for k, d in enumerate(b):
        if d == 1:
            nv.free(nv.out(0, k))
    groups = reshape_groups(a, b)
    if groups is None:
        raise HandlerError(f"{nv.label} reshapes {a} to {b} in a way that cannot be factored")
    for ga, gb in groups:
        if len(ga) == 1 and len(gb) == 1:
            nv.link(nv.inp(0, ga[0]), nv.out(0, gb[0]), a[ga[0]])
        elif len(ga) == 1:
            inner = a[ga[0]] // b[gb[0]]
            n = a[ga[0]]
            nv.link(nv.inp(0, ga[0]), nv.out(0, gb[0]), np.arange(n), np.arange(n) // inner)
            for k in gb[1:]:
                nv.block(nv.out(0, k), f"{nv.label} splits axis {ga[0]}: only its outer part "
                                       f"(axis {gb[0]}) can be pruned, not axis {k}")
        elif len(gb) == 1:
            inner = b[gb[0]] // a[ga[0]]
            n = b[gb[0]]
            nv.link(nv.out(0, gb[0]), nv.inp(0, ga[0]), np.arange(n), np.arange(n) // inner)
            for k in ga[1:]:
                nv.block(nv.inp(0, k), f"{nv.label} merges axis {k} into axis {gb[0]} as its "
                                       "inner part")
        else:
            for k in ga:
                nv.block(nv.inp(0, k), f"{nv.label} regroups axes {ga} into {gb}")
            for k in gb:
                nv.block(nv.out(0, k), f"{nv.label} regroups axes {ga} into {gb}")


def _shape_input_pieces(view: GraphView, name: str):
    """Where each entry of a runtime shape vector comes from: a list of (node idx, input idx,
    position in that input) for entries built by a Concat of pieces, else None."""
    idx = view.producer.get(name)
    if idx is None or view.nodes[idx].op_type != "Concat":
        return None
    pieces = []
    node = view.nodes[idx]
    for i, piece in enumerate(node.input):
        shape = view.shape(piece)
        if shape is None or len(shape) != 1:
            return None
        pieces.extend((idx, i, p) for p in range(shape[0]))
    return pieces


@rewrites("Reshape")
def _reshape_rewrite(nv: NodeView, ed) -> None:
    b = nv.out_shape(0)
    a = nv.in_shape(0)
    changes = {k: b[k] - len(ed.removed(nv.out(0, k))) for k in range(len(b))
               if len(ed.removed(nv.out(0, k)))}
    if not changes:
        return
    target = nv.const_in(1) if nv.view.is_static(nv.node.input[1]) else None
    if target is not None:
        new = np.array(target, dtype=np.int64).copy()
        for k, dim in changes.items():
            if new[k] > 0:
                new[k] = dim
            elif new[k] == 0 and not nv.attr("allowzero", 0):
                in_dim = a[k] - len(ed.removed(nv.inp(0, k))) if k < len(a) else None
                if in_dim != dim:
                    new[k] = dim
        ed.set_input(nv.idx, 1, new.astype(target.dtype))
        return
    pieces = _shape_input_pieces(nv.view, nv.node.input[1])
    for k, dim in changes.items():
        if pieces is None or k >= len(pieces):
            logger.debug("%s: runtime shape entry %d assumed to follow the pruned width",
                         nv.label, k)
            continue
        cidx, ci, pos = pieces[k]
        piece = nv.view.nodes[cidx].input[ci]
        value = nv.view.const(piece) if nv.view.is_static(piece) else None
        if value is None:
            continue  # computed from a tensor's Shape: follows the new width
        new = np.array(ed.current_input(cidx, ci, value), dtype=np.int64).copy()
        if new[pos] > 0:
            new[pos] = dim
            ed.set_input(cidx, ci, new.astype(value.dtype))


@handles("Expand")
def _expand(nv: NodeView) -> None:
    x, y = nv.in_shape(0), nv.out_shape(0)
    for k, d in enumerate(x):
        ok = len(y) - len(x) + k
        if d == y[ok]:
            nv.link(nv.inp(0, k), nv.out(0, ok), d)
        else:
            nv.free(nv.inp(0, k))
    nv.free(nv.inp(1, 0))


@rewrites("Expand")
def _expand_rewrite(nv: NodeView, ed) -> None:
    y = nv.out_shape(0)
    if not nv.view.is_static(nv.node.input[1]):
        _expand_rewrite_runtime(nv, ed, y)
        return
    target = nv.const_in(1)
    if target is None:
        return
    new = np.array(target, dtype=np.int64).copy()
    changed = False
    for k in range(len(y)):
        r = len(ed.removed(nv.out(0, k)))
        pos = len(new) - len(y) + k
        if r and pos >= 0 and new[pos] == y[k]:
            new[pos] = y[k] - r
            changed = True
    if changed:
        ed.set_input(nv.idx, 1, new.astype(target.dtype))


def _expand_rewrite_runtime(nv: NodeView, ed, y: tuple[int, ...]) -> None:
    """An Expand target built at runtime (a Concat of Shape pieces and constants, as in
    ``repeat_kv``): only its constant pieces of pruned axes are updated."""
    pieces = _shape_input_pieces(nv.view, nv.node.input[1])
    if pieces is None:
        return
    for k in range(len(y)):
        r = len(ed.removed(nv.out(0, k)))
        pos = len(pieces) - len(y) + k
        if not r or pos < 0:
            continue
        cidx, ci, p = pieces[pos]
        piece = nv.view.nodes[cidx].input[ci]
        if not nv.view.is_static(piece):
            continue
        value = nv.view.const(piece)
        new = np.array(ed.current_input(cidx, ci, value), dtype=np.int64).copy()
        if new[p] == y[k]:
            new[p] = y[k] - r
            ed.set_input(cidx, ci, new.astype(value.dtype))


@handles("Tile")
def _tile(nv: NodeView) -> None:
    x = nv.in_shape(0)
    repeats = nv.const_in(1)
    for k, d in enumerate(x):
        if repeats is not None and int(repeats[k]) == 1:
            nv.link(nv.inp(0, k), nv.out(0, k), d)
        else:
            reason = f"{nv.label} repeats axis {k}"
            nv.block(nv.inp(0, k), reason)
            nv.block(nv.out(0, k), reason)
    nv.free(nv.inp(1, 0))


@handles("ConstantOfShape")
def _constant_of_shape(nv: NodeView) -> None:
    # A uniform fill: slicing it is shrinking its shape (a rewrite), so every axis is free.
    for k in range(len(nv.out_shape(0))):
        nv.free(nv.out(0, k))


@rewrites("ConstantOfShape")
def _constant_of_shape_rewrite(nv: NodeView, ed) -> None:
    y = nv.out_shape(0)
    shape = nv.const_in(0)
    removed = [len(ed.removed(nv.out(0, k))) for k in range(len(y))]
    if not any(removed):
        return
    if shape is None:
        return  # computed from a Shape: follows the new width
    new = np.array(shape, dtype=np.int64) - np.array(removed, dtype=np.int64)
    ed.set_input(nv.idx, 0, new.astype(shape.dtype))


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


@handles("Resize", "Upsample")
def _resize(nv: NodeView) -> None:
    x, y = nv.in_shape(0), nv.out_shape(0)
    for k, d in enumerate(x):
        if d == y[k]:
            nv.link(nv.inp(0, k), nv.out(0, k), d)
        else:
            reason = f"{nv.label} resizes axis {k}"
            nv.block(nv.inp(0, k), reason)
            nv.block(nv.out(0, k), reason)
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
    for k, d in enumerate(x):
        if amount.get(k, (0, 0)) == (0, 0):
            nv.link(nv.inp(0, k), nv.out(0, k), d)
        else:
            reason = f"{nv.label} pads axis {k}"
            nv.block(nv.inp(0, k), reason)
            nv.block(nv.out(0, k), reason)
    for i in range(1, len(nv.node.input)):
        if nv.has_in(i):
            for k in range(len(nv.in_shape(i))):
                nv.free(nv.inp(i, k))
