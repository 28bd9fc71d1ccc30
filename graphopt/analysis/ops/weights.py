"""Coupling handlers for weight-bearing ops: Conv, ConvTranspose, Gemm, MatMul, Gather.

Their output-channel axes are the seeds of groups; their contraction axes are the
consumer side (role ``in``) a removed unit feeds.
"""

from __future__ import annotations

import numpy as np

from graphopt.analysis.ops.attention import prove_heads
from graphopt.analysis.registry import NodeView, axis_index, handles, rewrites


# =========================================================================== weight ops


def _batch_bias_seed(nv: NodeView, y, filters: int, const_w: bool) -> None:
    """Shared by Conv and ConvTranspose: the batch axis passes through, a bias (input 2)
    follows the output channels ``y``, which seed a group when the weight is constant."""
    nv.link(nv.out(0, 0), nv.inp(0, 0), nv.in_shape(0)[0])
    if nv.has_in(2):
        nv.link(y, nv.inp(2, 0), filters)
        nv.role(nv.inp(2, 0), "bias")
    if const_w:
        nv.seed(y)


@handles("Conv", seeds=True)
@handles("FusedConv", domain="com.microsoft", seeds=True)
def _conv(nv: NodeView) -> None:
    x, w = nv.in_shape(0), nv.in_shape(1)
    group = int(nv.attr("group", 1))
    channels, filters = x[1], w[0]
    y = nv.out(0, 1)
    const_w = nv.is_weight_in(1)
    nv.link(y, nv.inp(1, 0), filters)
    _batch_bias_seed(nv, y, filters, const_w)
    if const_w:
        nv.role(nv.inp(1, 0), "out")
    if group == 1:
        nv.link(nv.inp(0, 1), nv.inp(1, 1), channels)
        if const_w:
            nv.role(nv.inp(1, 1), "in")
            nv.role(nv.inp(0, 1), "act_in")
        else:
            nv.role(nv.inp(0, 1), "contract")
        return
    # grouped (incl. depthwise): only whole groups can go; a virtual axis holds the groups
    groups = nv.virtual(group)
    cin, cout = channels // group, filters // group
    nv.link(nv.inp(0, 1), groups, np.arange(channels), np.arange(channels) // cin)
    nv.link(y, groups, np.arange(filters), np.arange(filters) // cout)


@handles("ConvTranspose", seeds=True)
def _conv_transpose(nv: NodeView) -> None:
    x, w = nv.in_shape(0), nv.in_shape(1)
    group = int(nv.attr("group", 1))
    channels, per_group_out = x[1], w[1]
    filters = per_group_out * group
    y = nv.out(0, 1)
    const_w = nv.is_weight_in(1)
    nv.link(nv.inp(0, 1), nv.inp(1, 0), channels)
    _batch_bias_seed(nv, y, filters, const_w)
    if group == 1:
        nv.link(y, nv.inp(1, 1), filters)
        if const_w:
            nv.role(nv.inp(1, 1), "out")
            nv.role(nv.inp(1, 0), "in")
            nv.role(nv.inp(0, 1), "act_in")
        return
    groups = nv.virtual(group)
    cin = channels // group
    nv.link(nv.inp(0, 1), groups, np.arange(channels), np.arange(channels) // cin)
    nv.link(y, groups, np.arange(filters), np.arange(filters) // per_group_out)
    if const_w:
        nv.role(nv.inp(1, 0), "out")


@rewrites("Conv", "ConvTranspose")
@rewrites("FusedConv", domain="com.microsoft")
def _conv_rewrite(nv: NodeView, ed) -> None:
    group = int(nv.attr("group", 1))
    if group > 1:
        removed = len(ed.removed(nv.virtual(group)))
        if removed:
            ed.set_attr(nv.idx, "group", group - removed)


@handles("Gemm", seeds=True)
def _gemm(nv: NodeView) -> None:
    a, b = nv.in_shape(0), nv.in_shape(1)
    ka = 0 if nv.attr("transA", 0) else 1
    kb = 1 if nv.attr("transB", 0) else 0
    ma, nb = 1 - ka, 1 - kb
    m_dim, n_dim = a[ma], b[nb]
    nv.link(nv.inp(0, ka), nv.inp(1, kb), a[ka])
    nv.link(nv.out(0, 1), nv.inp(1, nb), n_dim)
    nv.link(nv.out(0, 0), nv.inp(0, ma), m_dim)
    if nv.has_in(2):
        c = nv.in_shape(2)
        for k, d in enumerate(c):
            ok = 2 - len(c) + k
            m = nv.inp(2, k)
            if d == (m_dim, n_dim)[ok]:
                nv.link(m, nv.out(0, ok), d)
                nv.role(m, "bias" if ok == 1 else "param")
            else:
                nv.free(m)
    if nv.is_weight_in(1) and not nv.is_weight_in(0):
        nv.seed(nv.out(0, 1))
        nv.role(nv.inp(1, nb), "out")
        nv.role(nv.inp(1, kb), "in")
        nv.role(nv.inp(0, ka), "act_in")
    elif nv.is_weight_in(0) and not nv.is_weight_in(1):
        nv.seed(nv.out(0, 0))
        nv.role(nv.inp(0, ma), "out")
        nv.role(nv.inp(0, ka), "in")
        nv.role(nv.inp(1, kb), "act_in")
    else:
        nv.role(nv.inp(0, ka), "contract")
        nv.role(nv.inp(1, kb), "contract")


@handles("MatMul", seeds=True)
def _matmul(nv: NodeView) -> None:
    a, b, y = nv.in_shape(0), nv.in_shape(1), nv.out_shape(0)
    ra, rb, ry = len(a), len(b), len(y)
    ka, kb = ra - 1, (rb - 2 if rb >= 2 else 0)
    nv.link(nv.inp(0, ka), nv.inp(1, kb), a[ka])
    m_axis = n_axis = None
    if ra >= 2:
        m_axis = ry - 2 if rb >= 2 else ry - 1
        nv.link(nv.inp(0, ra - 2), nv.out(0, m_axis), a[ra - 2])
    if rb >= 2:
        n_axis = ry - 1
        nv.link(nv.inp(1, rb - 1), nv.out(0, n_axis), b[rb - 1])
    batch = ry - (ra >= 2) - (rb >= 2)
    for shape, i in ((a, 0), (b, 1)):
        nb = len(shape) - 2
        for k in range(max(nb, 0)):
            ok = batch - nb + k
            if shape[k] == y[ok]:
                nv.link(nv.inp(i, k), nv.out(0, ok), shape[k])
            else:
                nv.free(nv.inp(i, k))
    if nv.is_weight_in(1) and not nv.is_weight_in(0) and n_axis is not None:
        nv.seed(nv.out(0, n_axis))
        nv.role(nv.inp(1, rb - 1), "out")
        nv.role(nv.inp(1, kb), "in")
        nv.role(nv.inp(0, ka), "act_in")
    elif nv.is_weight_in(0) and not nv.is_weight_in(1) and m_axis is not None:
        nv.seed(nv.out(0, m_axis))
        nv.role(nv.inp(0, ra - 2), "out")
        nv.role(nv.inp(0, ka), "in")
        nv.role(nv.inp(1, kb), "act_in")
    else:
        nv.role(nv.inp(0, ka), "contract")
        nv.role(nv.inp(1, kb), "contract")
        prove_heads(nv, a, b, y)


@handles("Gather")
def _gather(nv: NodeView) -> None:
    data = nv.in_shape(0)
    axis = axis_index(nv.attr("axis", 0), len(data))
    indices = nv.const_in(1)
    ri = len(nv.in_shape(1))
    for k, d in enumerate(data):
        if k < axis:
            nv.link(nv.inp(0, k), nv.out(0, k), d)
        elif k > axis:
            nv.link(nv.inp(0, k), nv.out(0, k + ri - 1), d)
            if nv.is_const_in(0):
                nv.role(nv.inp(0, k), "out")
    m = nv.inp(0, axis)
    if indices is not None and indices.ndim == 1:
        idx = np.where(indices < 0, indices + data[axis], indices)
        nv.link(nv.out(0, axis), m, np.arange(len(idx)), idx)
    elif indices is not None:
        nv.block(m, f"{nv.label} picks fixed indices of axis {axis}")
    else:
        nv.block(m, f"{nv.label} gathers computed indices along axis {axis}")
    for k in range(ri):
        nv.link(nv.inp(1, k), nv.out(0, axis + k), nv.in_shape(1)[k])


@rewrites("Gather")
def _gather_rewrite(nv: NodeView, ed) -> None:
    data = nv.in_shape(0)
    axis = axis_index(nv.attr("axis", 0), len(data))
    removed = ed.removed(nv.inp(0, axis))
    dropped = ed.removed(nv.out(0, axis))
    if not len(removed) and not len(dropped):
        return
    indices = nv.const_in(1)
    idx = np.where(indices < 0, indices + data[axis], indices)
    keep = np.setdiff1d(np.arange(len(idx)), dropped)
    new = idx[keep] - np.searchsorted(removed, idx[keep])
    ed.set_input(nv.idx, 1, new.astype(indices.dtype))
