"""Coupling handlers for the Reshape family (Reshape, Flatten, Squeeze, Unsqueeze), Expand,
Tile and ConstantOfShape, with their rewriters: which part of a split or merged axis is
carried (heads inside a packed Q/K/V projection or a batch-merged layout), and the shape
constants (static or built at runtime) that follow a removal.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from graphopt.analysis.registry import NodeView, axis_index, handles, rewrites
from graphopt.analysis.view import GraphView, HandlerError, Member, Slot

logger = logging.getLogger(__name__)


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
    """An axis kept whole maps one-to-one. An axis split into parts (hidden -> heads x
    head_dim, C -> groups x C/g) or parts merged into one (C, H, W -> C*H*W) couple through
    one *carried* part, so a unit is a block of indices of the whole axis:

    1. the outermost part by default;
    2. not a part that follows the dynamic input dims (the batch in ``[B*H, S, D]`` or
       ``[S, B*H, D]`` layouts: the heads are the carried part);
    3. not a small packing axis read one index at a time (the 3 of a packed Q/K/V
       projection ``[.., 3*E] -> [.., 3, E]`` picked by Gather): the heads inside go, the
       same ones from Q, K and V;
    4. axes regrouped across each other (``[B, H*D] -> [B*H, D]``) couple through their
       common factor (H), when the two shapes have a common refinement.
    The parts not carried are barriers, with the reason."""
    a, b = nv.in_shape(0), nv.out_shape(0)
    for i in range(1, len(nv.node.input)):
        if nv.has_in(i):
            nv.free_input(i)
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
        elif len(ga) == 1 or len(gb) == 1:
            split = len(ga) == 1
            whole, parts = (nv.inp(0, ga[0]), gb) if split else (nv.out(0, gb[0]), ga)
            shape = b if split else a
            side = nv.out if split else nv.inp
            tensor = nv.node.output[0] if split else nv.node.input[0]
            c = _carried_part(nv, tensor, parts, shape, packed=split,
                              whole=(nv.node.input[0] if split else nv.node.output[0],
                                     whole.axis))
            part = parts[c]
            inner = int(np.prod([shape[k] for k in parts[c + 1:]], dtype=np.int64))
            n = (a if split else b)[whole.axis]
            nv.link(whole, side(0, part), np.arange(n), (np.arange(n) // inner) % shape[part])
            for k in parts:
                if k != part:
                    nv.block(side(0, k), _part_reason(nv, split, whole.axis, k, part, c))
        else:
            _regroup(nv, a, b, ga, gb)


def _carried_part(nv: NodeView, tensor: str, parts: list[int], shape, packed: bool,
                  whole: tuple[str, int]) -> int:
    if packed and _selected(nv.view, tensor, parts[0], shape[parts[0]]):
        return 1
    # a part that follows the input dims while the whole axis does not has only absorbed a
    # size-1 batch (``[S, 1*H, D]``): the batch must vary inside the whole axis to count
    whole_varies = nv.view.varying(whole[0])
    if whole_varies is None or not whole_varies[whole[1]]:
        return 0
    varying = nv.view.varying(tensor)
    if varying is not None and varying[parts[0]]:
        for c, k in enumerate(parts):
            if not varying[k]:
                return c
    return 0


def _part_reason(nv: NodeView, split: bool, whole: int, k: int, part: int, c: int) -> str:
    if split:
        what = "is selected by index (its parts are read one by one)" if k < part and c \
            else f"is not the carried part (axis {part})"
        return f"{nv.label} splits axis {whole}: axis {k} {what}; only axis {part} can be pruned"
    return (f"{nv.label} merges axis {k} into axis {whole}, carried by axis {part}: axis {k} "
            "cannot be pruned")


def _factors(a, b, ga, gb):
    """The common refinement of two axis runs of equal product: (factor sizes outer to
    inner, factor range of each axis of ``ga``, of ``gb``), or None."""
    def strides(shape, axes):
        out, s = [], 1
        for k in reversed(axes):
            out.append(s)
            s *= shape[k]
        return out[::-1], s
    sa, total = strides(a, ga)
    sb, _ = strides(b, gb)
    chain = sorted(set(sa) | set(sb) | {total}, reverse=True)
    if any(chain[i] % chain[i + 1] for i in range(len(chain) - 1)):
        return None
    sizes = [chain[i] // chain[i + 1] for i in range(len(chain) - 1)]

    def ranges(shape, axes, st):
        out = {}
        for k, s in zip(axes, st):
            hi = chain.index(s)  # factors [lo, hi) cover this axis
            lo = chain.index(s * shape[k])
            out[k] = (lo, hi)
        return out
    return sizes, ranges(a, ga, sa), ranges(b, gb, sb)


def _regroup(nv: NodeView, a, b, ga, gb) -> None:
    refined = _factors(a, b, ga, gb)
    if refined is None:
        for k in ga:
            nv.block(nv.inp(0, k), f"{nv.label} regroups axes {ga} into {gb}")
        for k in gb:
            nv.block(nv.out(0, k), f"{nv.label} regroups axes {ga} into {gb}")
        return
    sizes, ra, rb = refined
    va = nv.view.varying(nv.node.input[0])
    vb = nv.view.varying(nv.node.output[0])
    batch = set()  # factors that are a whole varying axis: the batch, the sequence
    for rng, shape_vary in ((ra, va), (rb, vb)):
        for k, (lo, hi) in rng.items():
            if hi - lo == 1 and shape_vary is not None and shape_vary[k]:
                batch.add(lo)
    whole_a = {lo for lo, hi in ra.values() if hi - lo == 1}
    whole_b = {lo for lo, hi in rb.values() if hi - lo == 1}

    def choose(lo, hi, other_whole):
        cands = [f for f in range(lo, hi) if sizes[f] > 1 and f not in batch]
        split_both = [f for f in cands if f not in other_whole]
        return (split_both or cands or [lo])[0]
    ca = {k: choose(lo, hi, whole_b) for k, (lo, hi) in ra.items()}
    cb = {k: choose(lo, hi, whole_a) for k, (lo, hi) in rb.items()}

    def coord(rng, k, f, n):
        lo, hi = rng
        inner = int(np.prod(sizes[f + 1:hi], dtype=np.int64))
        return (np.arange(n) // inner) % sizes[f], inner
    for k, f in ca.items():
        j = next((j for j, g in cb.items() if g == f and rb[j][0] <= f < rb[j][1]), None)
        if j is None:
            nv.block(nv.inp(0, k), f"{nv.label} regroups axes {ga} into {gb}: axis {k} "
                                   "is not carried")
            continue
        xa, _ = coord(ra[k], k, f, a[k])
        xb, inner_b = coord(rb[j], j, f, b[j])
        nv.link(nv.inp(0, k), nv.out(0, j), np.arange(a[k]), xa * inner_b)
        nv.link(nv.out(0, j), nv.out(0, j), np.arange(b[j]), xb * inner_b)
    for j, f in cb.items():
        if not any(g == f for g in ca.values()):
            nv.block(nv.out(0, j), f"{nv.label} regroups axes {ga} into {gb}: axis {j} "
                                   "is not carried")


_SELECT_FOLLOW = {"Unsqueeze", "Squeeze", "Transpose", "Identity"}


def _selected(view: GraphView, name: str, axis: int, dim: int, depth: int = 6) -> bool:
    """Axis ``axis`` of ``name`` (a small packing axis, e.g. the 3 of Q/K/V) is only ever
    read one index at a time: every path through Unsqueeze/Squeeze/Transpose ends in a
    Gather of constant indices on it (or a Split of it into single slices)."""
    if dim < 2 or dim > 8 or depth == 0:
        return False
    uses = view.consumers.get(name, [])
    if not uses or name in view.graph_outputs:
        return False
    for idx, i in uses:
        node = view.nodes[idx]
        if i != 0 or node.domain not in ("", "ai.onnx"):
            return False
        shape = view.shape(name)
        rank = len(shape) if shape is not None else None
        if rank is None:
            return False
        op = node.op_type
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if op == "Gather":
            if axis_index(attrs.get("axis", 0), rank) != axis or not view.is_static(node.input[1]):
                return False
            continue
        if op == "Split":
            if axis_index(attrs.get("axis", 0), rank) != axis or len(node.output) != dim:
                return False
            continue
        if op not in _SELECT_FOLLOW:
            return False
        out = view.shape(node.output[0])
        if out is None:
            return False
        if op == "Transpose":
            perm = list(attrs.get("perm", list(range(rank))[::-1]))
            new = perm.index(axis)
        elif op == "Identity":
            new = axis
        else:
            axes = attrs.get("axes")
            if axes is None and len(node.input) > 1 and node.input[1]:
                value = view.const(node.input[1])
                axes = None if value is None else [int(v) for v in np.atleast_1d(value)]
            if axes is None:
                return False
            if op == "Unsqueeze":
                axes = sorted(axis_index(int(v), len(out)) for v in axes)
                keep = [k for k in range(len(out)) if k not in axes]
                new = keep[axis]
            else:
                axes = {axis_index(int(v), rank) for v in axes}
                if axis in axes:
                    return False
                new = axis - sum(1 for v in axes if v < axis)
        if not _selected(view, node.output[0], new, dim, depth - 1):
            return False
    return True


def _shape_input_pieces(view: GraphView, name: str):
    """Where each entry of a runtime shape vector comes from: a list of (node idx, input idx,
    position in that input) for entries built by a Concat of pieces, else None. The
    TorchScript ``expand`` idiom ``Where(Equal(s, -1), ones, s)`` and 1-D Reshape/Cast of
    the Concat are looked through (they keep every entry in place)."""
    idx = view.producer.get(name)
    for _ in range(4):
        if idx is None:
            return None
        node = view.nodes[idx]
        if node.op_type == "Where" and len(node.input) == 3:
            idx = view.producer.get(node.input[2])
        elif node.op_type in ("Reshape", "Cast", "Identity"):
            idx = view.producer.get(node.input[0])
        else:
            break
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
            # computed from a tensor's Shape: follows the new width, unless it is a
            # product with a constant (``B * heads`` in a ``[S, B*H, D]`` layout)
            _scale_runtime_product(nv, ed, piece, b[k], dim)
            continue
        new = np.array(ed.current_input(cidx, ci, value), dtype=np.int64).copy()
        if new[pos] > 0:
            new[pos] = dim
            ed.set_input(cidx, ci, new.astype(value.dtype))


_PASS_THROUGH = {"Reshape", "Unsqueeze", "Squeeze", "Cast", "Identity"}


def _scale_runtime_product(nv: NodeView, ed, name: str, old: int, new: int) -> None:
    """A runtime shape entry ``x * c`` (``c`` constant, through Reshape/Unsqueeze/Cast)
    that the analysis saw as ``old`` becomes ``new``: when ``x`` is read from an axis the
    removal leaves alone (the batch in ``B * heads``), ``c`` is scaled by new/old; when ``x``
    follows the removal (``kv_heads * n_rep``, read from a pruned tensor), nothing changes."""
    view = nv.view
    for _ in range(6):
        idx = view.producer.get(name)
        if idx is None:
            return
        node = view.nodes[idx]
        if node.op_type in _PASS_THROUGH:
            name = node.input[0]
            continue
        if node.op_type != "Mul":
            return
        for i in (0, 1):
            c = node.input[i]
            if view.is_static(c) and not view.is_static(node.input[1 - i]):
                source = _shape_source(view, node.input[1 - i])
                if source is None or len(ed.removed(Member(Slot(source[0]), source[1]))):
                    return
                cur = np.asarray(view.const(c))  # the original: several reshapes share it
                if cur.size != 1 or (int(cur.reshape(-1)[0]) * new) % old:
                    return
                scaled = np.full(cur.shape, int(cur.reshape(-1)[0]) * new // old)
                ed.set_input(idx, i, scaled.astype(cur.dtype))
                return
        return


def _shape_source(view: GraphView, name: str) -> tuple[str, int] | None:
    """(tensor, axis) a runtime scalar is read from: ``Gather(Shape(t), k)`` or a one-entry
    ``Shape(t, start, start + 1)``, through Reshape/Unsqueeze/Squeeze/Cast."""
    pick = 0
    for _ in range(6):
        idx = view.producer.get(name)
        if idx is None:
            return None
        node = view.nodes[idx]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type in _PASS_THROUGH:
            name = node.input[0]
        elif node.op_type == "Gather" and view.is_static(node.input[1]):
            k = np.asarray(view.const(node.input[1])).reshape(-1)
            if k.size != 1:
                return None
            pick += int(k[0])
            name = node.input[0]
        elif node.op_type == "Shape":
            shape = view.shape(node.input[0])
            if shape is None:
                return None
            start = axis_index(int(attrs.get("start", 0)), len(shape))
            return node.input[0], start + pick
        else:
            return None
    return None


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
