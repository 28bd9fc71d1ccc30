"""Coupling handlers for fused attention ops: a head (or a KV group) is one unit.

Covered layouts (hidden = heads × head_dim on the last axis, ``[batch, seq, hidden]``):

1. ``com.microsoft`` ``MultiHeadAttention`` with separate query, key and value (optional
   constant packed bias ``[Dq + Dk + Dv]``), attribute ``num_heads``;
2. ``com.microsoft`` ``GroupQueryAttention`` with separate query, key and value,
   ``num_heads`` query heads sharing ``kv_num_heads`` key/value heads (a unit is one KV
   head with its query heads);
3. ``com.microsoft`` ``Attention`` with a constant packed QKV weight ``[D_in, Dq+Dk+Dv]``
   (and bias): it is a seed like a MatMul; ``num_heads`` and ``qkv_hidden_sizes`` follow;
4. ONNX ``Attention`` (opset 23+): 3-D inputs with ``q_num_heads``/``kv_num_heads``, or 4-D
   ``[batch, heads, seq, head_dim]`` inputs whose heads axis is carried directly;
5. ONNX and ``com.microsoft`` ``RotaryEmbedding``: head-preserving (rotation stays inside a
   head); a 3-D input's ``num_heads`` follows.

Every atom of a unit is linked to the first key atom of its KV head (a star), so the
components are whole heads. Layouts outside these (packed QKV in the query input, KV-cache
inputs/outputs, a computed bias) raise ``HandlerError`` with the reason: the analysis then
reports the op as a barrier.
"""

from __future__ import annotations

import numpy as np

from graphopt.analysis.view import HandlerError, Member
from graphopt.analysis.registry import NodeView, handles, rewrites

_MS = "com.microsoft"

# ops allowed between the QKᵀ product and its Softmax (scaling, masks, casts) and between
# the Softmax and the product with V (dropout, casts, masking of fully masked rows)
_SCORE_OPS = {"Mul", "Div", "Add", "Sub", "Where", "Cast", "Identity", "Dropout", "Tanh",
              "Max", "Min", "Clip"}
_HOPS = 8


def _reaches_softmax(view, name: str, rank: int) -> bool:
    """``name`` flows into a Softmax over its last axis through score ops only."""
    seen: set[str] = set()
    frontier = [name]
    for _ in range(_HOPS):
        nxt = []
        for t in frontier:
            for idx, _i in view.consumers.get(t, []):
                node = view.nodes[idx]
                if node.domain not in ("", "ai.onnx"):
                    continue
                if node.op_type in ("Softmax", "LogSoftmax"):
                    axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
                    if axis in (-1, rank - 1):
                        return True
                elif node.op_type in _SCORE_OPS and node.output and node.output[0] not in seen:
                    seen.add(node.output[0])
                    nxt.append(node.output[0])
        frontier = nxt
    return False


def _from_softmax(view, name: str, rank: int) -> bool:
    """``name`` is a Softmax over its last axis, seen through score ops."""
    for _ in range(_HOPS):
        idx = view.producer.get(name)
        if idx is None:
            return False
        node = view.nodes[idx]
        if node.domain not in ("", "ai.onnx"):
            return False
        if node.op_type == "Softmax":
            axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
            return axis in (-1, rank - 1)
        if node.op_type not in _SCORE_OPS:
            return False
        name = node.input[2] if node.op_type == "Where" else node.input[0]
    return False


def prove_heads(nv: NodeView, a: tuple[int, ...], b: tuple[int, ...],
                y: tuple[int, ...]) -> None:
    """A MatMul of two activations is an attention core when it is QKᵀ feeding a Softmax
    over the keys, or the product of such a Softmax with V: its batch axes (all but the
    last two) are then proven to carry heads. Nothing else makes a unit a head."""
    if len(a) < 3 or len(b) < 3:
        return
    if _reaches_softmax(nv.view, nv.node.output[0], len(y)):
        head_dim = a[-1]
    elif _from_softmax(nv.view, nv.node.input[0], len(a)):
        head_dim = b[-1]
    else:
        return
    for i, shape in ((0, a), (1, b)):
        for k in range(len(shape) - 2):
            nv.head(nv.inp(i, k), head_dim, 1)
    for k in range(len(y) - 2):
        nv.head(nv.out(0, k), head_dim, 1)


def _check_no_cache(nv: NodeView, first_cache_input: int | None, outputs: int = 1) -> None:
    view = nv.view
    for i in range(outputs, len(nv.node.output)):
        name = nv.node.output[i]
        if name and (view.consumers.get(name) or name in view.graph_outputs):
            raise HandlerError(f"{nv.label} has KV-cache outputs; its heads are not pruned")
    if first_cache_input is not None:
        for i in (first_cache_input, first_cache_input + 1):
            if nv.has_in(i):
                raise HandlerError(f"{nv.label} reads a KV cache; its heads are not pruned")


def _star(nv: NodeView, hub: Member, hub_dim: int, kv_heads: int, rep: int,
          parts: list[tuple[Member, int, bool]]) -> None:
    """Link every atom of ``parts`` to the first ``hub`` atom of its KV head.

    ``parts``: (member, per-head width, is_query): query heads ``h`` belong to KV head
    ``h // rep``; key/value heads are their own KV head.
    """
    for m, width, is_query in parts:
        n = (kv_heads * rep if is_query else kv_heads) * width
        atoms = np.arange(n)
        head = atoms // width
        kv = head // rep if is_query else head
        nv.link(m, hub, atoms, kv * hub_dim)


def _seq_batch(nv: NodeView, q: int, k: int, v: int, rank: int = 3) -> None:
    qs, ks, vs = nv.in_shape(q), nv.in_shape(k), nv.in_shape(v)
    y = nv.out_shape(0)
    nv.link(nv.inp(q, 0), nv.out(0, 0), qs[0])
    nv.link(nv.inp(k, 0), nv.out(0, 0), ks[0])
    nv.link(nv.inp(v, 0), nv.out(0, 0), vs[0])
    seq = rank - 2
    nv.link(nv.inp(q, seq), nv.out(0, seq), y[seq])
    nv.link(nv.inp(k, seq), nv.inp(v, seq), ks[seq])


def _hidden_heads(nv: NodeView, q: int, k: int, v: int, heads: int, kv_heads: int,
                  bias: int | None = None) -> None:
    """The 3-D layout: link Q, K, V, output (and a packed bias) head by head."""
    if heads <= 0 or kv_heads <= 0 or heads % kv_heads:
        raise HandlerError(f"{nv.label}: {heads} query heads cannot share {kv_heads} KV heads")
    if not (nv.has_in(k) and nv.has_in(v)):
        raise HandlerError(f"{nv.label} takes packed QKV in its query input; its heads are "
                           "not pruned")
    qs, ks, vs, y = nv.in_shape(q), nv.in_shape(k), nv.in_shape(v), nv.out_shape(0)
    if len(qs) != 3 or len(ks) != 3 or len(vs) != 3:
        raise HandlerError(f"{nv.label}: only [batch, seq, hidden] query/key/value are handled")
    rep = heads // kv_heads
    dq, dk, dv = qs[2] // heads, ks[2] // kv_heads, vs[2] // kv_heads
    if dq * heads != qs[2] or dk * kv_heads != ks[2] or dv * kv_heads != vs[2] or \
            y[2] != heads * dv:
        raise HandlerError(f"{nv.label}: hidden sizes do not split into {heads} heads")
    _seq_batch(nv, q, k, v)
    hub = nv.inp(k, 2)
    nv.head(nv.inp(q, 2), dq, dq)
    nv.head(nv.out(0, 2), dv, dv)
    parts = [(nv.inp(q, 2), dq, True), (hub, dk, False), (nv.inp(v, 2), dv, False),
             (nv.out(0, 2), dv, True)]
    if bias is not None and nv.has_in(bias):
        if not nv.is_const_in(bias):
            raise HandlerError(f"{nv.label}: a computed bias is not handled")
        b = nv.inp(bias, 0)
        nq, nk = qs[2], ks[2]
        atoms = np.arange(nq + nk + vs[2])
        head = np.where(atoms < nq, atoms // dq // rep,
                        np.where(atoms < nq + nk, (atoms - nq) // dk, (atoms - nq - nk) // dv))
        nv.link(b, hub, atoms, head * dk)
        nv.role(b, "param")
    _star(nv, hub, dk, kv_heads, rep, parts)


def _removed_kv_heads(nv: NodeView, ed, k: int, kv_heads: int) -> int:
    dk = nv.in_shape(k)[2] // kv_heads
    return len(ed.removed(nv.inp(k, 2))) // dk


def _set_gqa_heads(nv: NodeView, ed, query_attr: str) -> None:
    """After KV heads left a grouped-query op (keys on input 1), lower ``kv_num_heads`` and
    the query head count ``query_attr`` by the query heads that shared them."""
    heads = int(nv.attr(query_attr, 0))
    kv_heads = int(nv.attr("kv_num_heads", 0))
    gone = _removed_kv_heads(nv, ed, 1, kv_heads)
    if gone:
        ed.set_attr(nv.idx, "kv_num_heads", kv_heads - gone)
        ed.set_attr(nv.idx, query_attr, heads - gone * (heads // kv_heads))


# --------------------------------------------------------------------------- com.microsoft


@handles("MultiHeadAttention", domain=_MS)
def _ms_mha(nv: NodeView) -> None:
    _check_no_cache(nv, 6)
    heads = int(nv.attr("num_heads", 0))
    _hidden_heads(nv, 0, 1, 2, heads, heads, bias=3)


@rewrites("MultiHeadAttention", domain=_MS)
def _ms_mha_rewrite(nv: NodeView, ed) -> None:
    heads = int(nv.attr("num_heads", 0))
    gone = _removed_kv_heads(nv, ed, 1, heads)
    if gone:
        ed.set_attr(nv.idx, "num_heads", heads - gone)


@handles("GroupQueryAttention", domain=_MS)
def _ms_gqa(nv: NodeView) -> None:
    _check_no_cache(nv, None)
    if nv.has_in(3) or nv.has_in(4):
        raise HandlerError(f"{nv.label} reads a KV cache; its heads are not pruned")
    heads = int(nv.attr("num_heads", 0))
    kv_heads = int(nv.attr("kv_num_heads", 0))
    _hidden_heads(nv, 0, 1, 2, heads, kv_heads)


@rewrites("GroupQueryAttention", domain=_MS)
def _ms_gqa_rewrite(nv: NodeView, ed) -> None:
    _set_gqa_heads(nv, ed, "num_heads")


@handles("Attention", domain=_MS, seeds=True)
def _ms_attention(nv: NodeView) -> None:
    """input [B, S, D_in] · weight [D_in, Dq+Dk+Dv] (+ bias) -> [B, S, Dv]."""
    _check_no_cache(nv, None)
    if nv.has_in(4) or (len(nv.node.input) > 6 and nv.has_in(6)):
        raise HandlerError(f"{nv.label} reads a KV cache; its heads are not pruned")
    if not nv.is_const_in(1) or nv.is_const_in(0):
        raise HandlerError(f"{nv.label}: only a constant packed QKV weight is handled")
    heads = int(nv.attr("num_heads", 0))
    x, w, y = nv.in_shape(0), nv.in_shape(1), nv.out_shape(0)
    sizes = [int(s) for s in (nv.attr("qkv_hidden_sizes") or [])] or [w[1] // 3] * 3
    nq, nk, nvv = sizes
    if heads <= 0 or nq % heads or nk % heads or nvv % heads or y[-1] != nvv or \
            sum(sizes) != w[1] or len(x) != 3:
        raise HandlerError(f"{nv.label}: QKV sizes {sizes} do not split into {heads} heads")
    dq, dk, dv = nq // heads, nk // heads, nvv // heads
    nv.link(nv.inp(0, 2), nv.inp(1, 0), x[2])
    nv.link(nv.inp(0, 0), nv.out(0, 0), x[0])
    nv.link(nv.inp(0, 1), nv.out(0, 1), x[1])
    wm = nv.inp(1, 1)
    atoms = np.arange(w[1])
    head = np.where(atoms < nq, atoms // dq,
                    np.where(atoms < nq + nk, (atoms - nq) // dk, (atoms - nq - nk) // dv))
    hub_atoms = nq + head * dk  # first key column of the head
    nv.link(wm, wm, atoms, hub_atoms)
    nv.link(nv.out(0, 2), wm, np.arange(nvv), nq + (np.arange(nvv) // dv) * dk)
    if nv.has_in(2):
        if not nv.is_const_in(2):
            raise HandlerError(f"{nv.label}: a computed bias is not handled")
        nv.link(nv.inp(2, 0), wm, atoms, atoms)
        nv.role(nv.inp(2, 0), "bias")
    nv.head(nv.out(0, 2), dv, dv)
    nv.role(wm, "out")
    nv.role(nv.inp(1, 0), "in")
    nv.role(nv.inp(0, 2), "act_in")
    nv.seed(nv.out(0, 2))


@rewrites("Attention", domain=_MS)
def _ms_attention_rewrite(nv: NodeView, ed) -> None:
    heads = int(nv.attr("num_heads", 0))
    y = nv.out_shape(0)
    dv = y[-1] // heads
    gone = len(ed.removed(nv.out(0, 2))) // dv
    if not gone:
        return
    ed.set_attr(nv.idx, "num_heads", heads - gone)
    sizes = nv.attr("qkv_hidden_sizes")
    if sizes:
        ed.set_attr(nv.idx, "qkv_hidden_sizes",
                    [int(s) - gone * (int(s) // heads) for s in sizes])


# --------------------------------------------------------------------------- ONNX Attention


@handles("Attention")
def _onnx_attention(nv: NodeView) -> None:
    """ONNX Attention (opset 23): Q, K, V, attn_mask, past_key, past_value, ..."""
    _check_no_cache(nv, 4)
    qs = nv.in_shape(0)
    if len(qs) == 3:
        heads = int(nv.attr("q_num_heads", 0))
        kv_heads = int(nv.attr("kv_num_heads", 0))
        _hidden_heads(nv, 0, 1, 2, heads, kv_heads)
        return
    ks, vs, y = nv.in_shape(1), nv.in_shape(2), nv.out_shape(0)
    if len(ks) != 4 or len(vs) != 4 or len(y) != 4:
        raise HandlerError(f"{nv.label}: mixed 3-D/4-D inputs are not handled")
    heads, kv_heads = qs[1], ks[1]
    if heads % kv_heads:
        raise HandlerError(f"{nv.label}: {heads} query heads cannot share {kv_heads} KV heads")
    rep = heads // kv_heads
    _seq_batch(nv, 0, 1, 2, rank=4)
    hub = nv.inp(1, 1)
    q_heads = np.arange(heads)
    nv.link(nv.inp(0, 1), hub, q_heads, q_heads // rep)
    nv.link(nv.out(0, 1), hub, q_heads, q_heads // rep)
    nv.link(nv.inp(2, 1), hub, kv_heads)
    nv.head(nv.inp(0, 1), qs[3], 1)
    nv.head(nv.out(0, 1), qs[3], 1)
    for i, m in ((0, nv.inp(0, 3)), (1, nv.inp(1, 3)), (2, nv.inp(2, 3))):
        nv.block(m, f"{nv.label} contracts head_dim")
    nv.block(nv.out(0, 3), f"{nv.label} contracts head_dim")
    if nv.has_in(3):
        mask = nv.view.shapes.get(nv.node.input[3]) or ()
        nv.free_input(3)
        if len(mask) == 4 and mask[1] not in (1, None) and isinstance(mask[1], int):
            raise HandlerError(f"{nv.label}: a per-head attention mask is not handled")


@rewrites("Attention")
def _onnx_attention_rewrite(nv: NodeView, ed) -> None:
    if len(nv.in_shape(0)) != 3:
        return
    _set_gqa_heads(nv, ed, "q_num_heads")


# --------------------------------------------------------------------------- rotary


@handles("RotaryEmbedding")
@handles("RotaryEmbedding", domain=_MS)
def _rotary(nv: NodeView) -> None:
    """RoPE rotates pairs of channels inside one head: every axis is carried, and on a 3-D
    ``[batch, seq, hidden]`` input the channels of a head are tied together (whole heads
    stay valid units). The cos/sin caches and position ids never carry a pruned axis."""
    x = nv.in_shape(0)
    for i in range(1, len(nv.node.input)):
        if nv.has_in(i):
            nv.free_input(i)
    for k, d in enumerate(x):
        if k != len(x) - 1 or len(x) == 4:
            nv.link(nv.inp(0, k), nv.out(0, k), d)
    if len(x) == 4:
        # [batch, heads, seq, head_dim] (ONNX, com.microsoft) — heads on axis 1
        nv.block(nv.inp(0, 3), f"{nv.label} rotates within head_dim")
        nv.block(nv.out(0, 3), f"{nv.label} rotates within head_dim")
        return
    if len(x) != 3:
        raise HandlerError(f"{nv.label}: only 3-D or 4-D inputs are handled")
    heads = int(nv.attr("num_heads", 0) or 0)
    if heads:
        head_dim = x[2] // heads
    elif not nv.attr("rotary_embedding_dim", 0):
        cos = 2 if nv.node.domain == _MS else 1  # ONNX: X, cos, sin; ms: X, pos, cos, sin
        head_dim = 2 * int(nv.in_shape(cos)[-1])
    else:
        raise HandlerError(f"{nv.label}: a partial rotary dim without num_heads is not handled")
    if head_dim <= 0 or x[2] % head_dim:
        raise HandlerError(f"{nv.label}: hidden {x[2]} does not split into heads of {head_dim}")
    atoms = np.arange(x[2])
    nv.link(nv.inp(0, 2), nv.out(0, 2), atoms, atoms)
    nv.link(nv.inp(0, 2), nv.inp(0, 2), atoms, (atoms // head_dim) * head_dim)


@rewrites("RotaryEmbedding")
@rewrites("RotaryEmbedding", domain=_MS)
def _rotary_rewrite(nv: NodeView, ed) -> None:
    x = nv.in_shape(0)
    heads = int(nv.attr("num_heads", 0) or 0)
    if len(x) != 3 or not heads:
        return
    gone = len(ed.removed(nv.inp(0, 2))) // (x[2] // heads)
    if gone:
        ed.set_attr(nv.idx, "num_heads", heads - gone)

