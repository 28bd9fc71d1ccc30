"""Coupled-group analysis: which channels must be removed together, found on the ONNX graph.

Removing index *i* of an axis is only legal if every tensor sharing that axis loses the same
index in the same step. This module finds those sets on any graph, with one small handler per
op type (``graphopt.analysis.registry``) that says how an axis index maps between the op's
inputs and outputs.

Vocabulary:

1. A *slot* is a place values live: an activation tensor (shared by all its consumers), or
   one *use* of a constant by one node input (constants can always be copied, so two nodes
   sharing a deduplicated weight do not couple), or a *virtual* axis a handler adds (the
   groups of a grouped convolution).
2. A *member* is one axis of a slot; an *atom* is one index of a member.
3. Handlers *link* atoms (removing one forces removing the other), *block* a member (a
   barrier: LayerNorm over it, a graph output, an op without a handler) or declare it *free*
   (the op does not care, e.g. ``Shape``).
4. Starting from *seeds* (the output-channel axes of weight-bearing ops: Conv/ConvTranspose/
   Gemm/MatMul with a constant weight, packed-QKV attention; the ops whose handler is
   registered with ``seeds=True`` say which), the analysis visits every member linked to a visited member; the
   connected components of the linked atoms are the *units*. A unit is the smallest legal
   removal: one channel, or a block of channels (a conv group, an attention head), with all
   the weights, biases, BN parameters and constants that go with it.
5. Units touching the same members the same number of times form a *group* (e.g. the
   channels of a residual stage). A group touching a blocked member is not prunable and
   carries the reason (which op, which axis).
6. Each group says what its unit is (``Group.unit``): ``channel`` (a conv filter),
   ``conv-group`` (whole groups of a grouped convolution), ``neuron`` (one column of a
   Gemm/MatMul), ``head`` (an attention head, or a KV head with the query heads that share
   it: ``head_dim``, ``heads_per_unit``), ``block`` (a block of channels that is not proven
   to be a head, e.g. an axis split by a Reshape with no attention over it). A unit is a
   head only when a handler proved it: a QKᵀ product feeding a Softmax over the keys (or the
   Softmax's product with V) whose batch axes carry the unit, or a fused attention op.

``coupled_groups(model)`` lists the groups; ``analyze(model)`` returns the full ``Coupling``
that ``graphopt.prune.apply`` uses to remove units.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

import graphopt.analysis.ops  # noqa: F401 - registers the per-op handlers
from graphopt.analysis.registry import couple_node, handler_for
from graphopt.analysis.view import GraphView, Member, NodeCoupling

logger = logging.getLogger(__name__)



# ---------------------------------------------------------------------------- groups


@dataclass
class Group:
    """Units that must be chosen together, with everything each unit removes.

    ``index[member]`` is an int array [size, width]: the atoms unit *u* removes on ``member``
    (width > 1 when a unit is a block, e.g. C×H×W features of a flattened channel or the
    channels of one conv group).
    """

    id: int
    source: str
    source_op: str
    kind: str  # "channels" (conv source), "neurons" (Gemm/MatMul source), "blocks"
    size: int
    index: dict[Member, np.ndarray]
    roles: dict[Member, str]
    prunable: bool
    reason: str | None
    labels: dict[Member, str] = field(default_factory=dict, repr=False)
    source_nodes: tuple[str, ...] = ()
    node_names: tuple[str, ...] = ()
    position: int = 0  # graph position of the source node, for a stable listing order
    unit: str = "neuron"  # channel | conv-group | neuron | head | block (module doc, 6.)
    head_dim: int | None = None  # for unit == "head"
    heads_per_unit: int = 1  # query heads per unit (> 1: a KV head shared by several)
    barrier: Member | None = field(default=None, repr=False)  # where ``reason`` stops it

    @property
    def members(self) -> list[str]:
        out = []
        for m, idx in self.index.items():
            role = self.roles.get(m)
            width = idx.shape[1]
            text = self.labels.get(m, str(m))
            if role:
                text += f" ({role})"
            if width > 1:
                text += f" ×{width} per unit"
            out.append(text)
        return out

    @property
    def unit_width(self) -> int:
        for m, role in self.roles.items():
            if role == "out" and m in self.index:
                return int(self.index[m].shape[1])
        return 1

    def members_with_role(self, *roles: str) -> list[Member]:
        return [m for m in self.index if self.roles.get(m) in roles]

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "source": self.source,
            "source_op": self.source_op,
            "kind": self.kind,
            "size": self.size,
            "unit": self.unit,
            "unit_width": self.unit_width,
            **({"head_dim": self.head_dim, "heads_per_unit": self.heads_per_unit}
               if self.unit == "head" else {}),
            "prunable": self.prunable,
            "reason": self.reason,
            "members": self.members,
        }


@dataclass
class Coupling:
    """The analysis of one model: its groups plus what the apply engine needs."""

    model: onnx.ModelProto
    view: GraphView
    groups: list[Group]
    node_couplings: dict[int, NodeCoupling]
    dims: dict[Member, int]
    # weight ops no handler can see into (integer-quantized kernels): (node label, reason)
    opaque: list[tuple[str, str]] = field(default_factory=list)

    def group(self, gid: int) -> Group:
        for g in self.groups:
            if g.id == gid:
                return g
        raise KeyError(gid)


def coupled_groups(model: onnx.ModelProto,
                   input_shapes: Mapping[str, tuple[int, ...]] | None = None) -> list[Group]:
    """Every coupled group of ``model`` (prunable or with the reason it is not)."""
    return analyze(model, input_shapes).groups


def analyze(model: onnx.ModelProto,
            input_shapes: Mapping[str, tuple[int, ...]] | None = None,
            shapes: Mapping[str, tuple] | None = None) -> Coupling:
    """Run the coupling analysis (see the module doc)."""

    view = GraphView(model, shapes, input_shapes)
    cache: dict[int, NodeCoupling] = {}

    def coupling_of(idx: int) -> NodeCoupling:
        if idx not in cache:
            nc = couple_node(view, idx)
            nc.index()
            view.virtual_dims.update(nc.virtual_dims)
            cache[idx] = nc
        return cache[idx]

    # seeds: output-channel axes of weight-bearing ops
    seeds: list[Member] = []
    for idx, node in enumerate(view.nodes):
        handler = handler_for(node)
        if handler is not None and handler.seeds:
            seeds.extend(coupling_of(idx).seeds)
    seed_set = set(seeds)

    visited: set[Member] = set()
    blocks: dict[Member, str] = {}
    link_ids: set[tuple[int, int]] = set()
    queue = list(dict.fromkeys(seeds))
    visited.update(queue)
    while queue:
        m = queue.pop()
        slot = m.slot
        if slot.use is None:
            if slot.tensor in view.graph_outputs:
                blocks.setdefault(m, f"'{slot.tensor}' is a graph output (axis {m.axis})")
            if slot.tensor in view.graph_inputs:
                blocks.setdefault(m, f"'{slot.tensor}' is a graph input (axis {m.axis})")
        for idx in view.nodes_touching(slot):
            nc = coupling_of(idx)
            if nc.failure is not None:
                blocks.setdefault(m, nc.failure)
                continue
            ids = nc.by_member.get(m)
            if ids:
                for i in ids:
                    link_ids.add((idx, i))
                    a, b, _, _ = nc.links[i]
                    other = b if a == m else a
                    if other not in visited:
                        visited.add(other)
                        queue.append(other)
            if m in nc.blocks:
                blocks.setdefault(m, nc.blocks[m])
            elif not ids and m not in nc.free:
                blocks.setdefault(m, f"{view.node_label(idx)} does not carry axis {m.axis} of "
                                     f"{_short(view, m)}")
        if slot.use is None and slot.tensor not in view.producer and \
                slot.tensor not in view.graph_inputs:
            blocks.setdefault(m, f"'{slot.tensor}' has no producer")

    dims: dict[Member, int] = {}
    for m in visited:
        d = view.member_dim(m)
        if d is None:
            blocks.setdefault(m, f"shape of {_short(view, m)} is unknown (give --input-shape)")
            d = 0
        dims[m] = d
    groups = _build_groups(view, visited, dims, blocks, cache, link_ids, seed_set)
    logger.debug("coupling: %d members, %d groups", len(visited), len(groups))
    opaque = [(view.node_label(i), f"{view.node_label(i)} is an integer-quantized kernel "
               f"(weight '{n.input[_QUANT_WEIGHT[n.op_type]]}') that no handler can slice; "
               "to prune: prune the float model, then quantize it (or quantize to QDQ, "
               "whose DequantizeLinear weights are pruned)")
              for i, n in enumerate(view.nodes)
              if n.op_type in _QUANT_WEIGHT and handler_for(n) is None and
              len(n.input) > _QUANT_WEIGHT[n.op_type]]
    return Coupling(model, view, groups, cache, dims, opaque)


# integer-quantized weight ops (onnxruntime's dynamic/QOperator quantizers): input of the weight
_QUANT_WEIGHT = {"ConvInteger": 1, "MatMulInteger": 1, "QLinearConv": 3, "QLinearMatMul": 3,
                 "DynamicQuantizeLSTM": 1, "DynamicQuantizeMatMul": 1, "MatMulNBits": 1,
                 "QGemm": 3, "MatMulIntegerToFloat": 1}


# what would make a barrier prunable, by the kind of barrier its text names (display only)
_FIXES = (
    ("is a graph output", "graph outputs keep their shape: exclude this group, or cut units "
                          "that do not reach an output"),
    ("is a graph input", "graph inputs keep their shape: exclude this group"),
    ("has no coupling handler", "add a coupling handler for the op "
                                "(graphopt.analysis.registry.handles)"),
    ("is unknown", "give --input-shape with concrete dims"),
    ("normalizes over", "a normalized axis is never cut: prune units inside the block "
                        "(heads, FFN neurons) instead"),
    ("contracts head_dim", "heads are cut whole: the head_dim axis itself is never cut"),
    ("rotates within", "heads are cut whole: the head_dim axis itself is never cut"),
    ("computed at runtime", "fold it to a constant first (--pass cleanup, or give "
                            "--input-shape)"),
    ("computed indices", "fold the indices to constants first (--pass cleanup)"),
    ("KV cache", "export the model without past key/values (use_cache=False) to prune "
                 "its heads"),
    ("splits axis", "only the carried part of a split axis can be cut"),
    ("merges axis", "only the carried part of a merged axis can be cut; a batch merged "
                    "with the heads needs a dynamic batch (export with dynamic shapes)"),
    ("regroups axes", "the two shapes have no common factoring: export with dynamic "
                      "shapes, or reshape along whole axes"),
    ("does not carry axis", "the op reads this axis as a whole; a handler that maps it "
                            "would make the group prunable"),
    ("picks fixed indices", "fold or remove the Gather (--pass cleanup)"),
)


def barrier_reason(text: str, m: Member) -> str:
    """A group's reason: the barrier (naming the op), the tensor it stops on, and what would
    make the group prunable."""
    if f"'{m.slot.tensor}'" not in text and not m.slot.is_virtual:
        text += f" (at '{m.slot.tensor}' axis {m.axis})"
    fix = next((f for key, f in _FIXES if key in text), None)
    return f"{text}; to prune: {fix}" if fix else text


def _short(view: GraphView, m: Member) -> str:
    if m.slot.use is None:
        return f"'{m.slot.tensor}'"
    if m.slot.is_virtual:
        return "its groups"
    return f"'{m.slot.tensor}'"


def _components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected-component labels (smallest atom id of each component) of an edge list."""
    labels = np.arange(n, dtype=np.int64)
    while True:
        la, lb = labels[a], labels[b]
        diff = la != lb
        if not diff.any():
            return labels
        hi = np.maximum(la[diff], lb[diff])
        lo = np.minimum(la[diff], lb[diff])
        np.minimum.at(labels, hi, lo)
        while True:
            nxt = labels[labels]
            if np.array_equal(nxt, labels):
                break
            labels = nxt


def _build_groups(view: GraphView, visited: set[Member], dims: dict[Member, int],
                  blocks: dict[Member, str], cache: dict[int, NodeCoupling],
                  link_ids: set[tuple[int, int]], seed_set: set[Member]) -> list[Group]:
    members = sorted(visited, key=_member_order(view))
    if not members or not any(dims[m] for m in members):
        return []
    mid = {m: k for k, m in enumerate(members)}
    offsets = np.zeros(len(members) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([dims[m] for m in members])
    n_atoms = int(offsets[-1])
    edge_a, edge_b = [], []
    for idx, i in sorted(link_ids):
        a, b, ia, ib = cache[idx].links[i]
        if dims[a] == 0 or dims[b] == 0:
            continue
        ia = np.asarray(ia, dtype=np.int64)
        ib = np.asarray(ib, dtype=np.int64)
        ok = (ia >= 0) & (ia < dims[a]) & (ib >= 0) & (ib < dims[b])
        if not ok.all():
            # a handler's map disagrees with the inferred dims: refuse both sides
            reason = f"{view.node_label(idx)} maps axis {a.axis} inconsistently with its shapes"
            blocks.setdefault(a, reason)
            blocks.setdefault(b, reason)
            ia, ib = ia[ok], ib[ok]
        edge_a.append(offsets[mid[a]] + ia)
        edge_b.append(offsets[mid[b]] + ib)
    for idx, i in sorted(link_ids):
        a, b, _, _ = cache[idx].links[i]
        if (dims[a] == 0) != (dims[b] == 0):
            # an axis of unknown size cannot be sliced: neither can what it is coupled to
            unknown, known = (a, b) if dims[a] == 0 else (b, a)
            blocks.setdefault(known, blocks.get(unknown) or
                              f"shape of {_short(view, unknown)} is unknown")
    ea = np.concatenate(edge_a) if edge_a else np.zeros(0, np.int64)
    eb = np.concatenate(edge_b) if edge_b else np.zeros(0, np.int64)
    labels = _components(n_atoms, ea, eb)

    atom_member = np.repeat(np.arange(len(members)), [dims[m] for m in members])
    atom_local = np.arange(n_atoms) - offsets[atom_member]
    order = np.lexsort((atom_local, atom_member, labels))
    s_label, s_member, s_local = labels[order], atom_member[order], atom_local[order]

    # one signature per unit: the members it touches and how many atoms on each
    pair_start = np.flatnonzero(np.r_[True, (s_label[1:] != s_label[:-1]) |
                                      (s_member[1:] != s_member[:-1])])
    pair_label = s_label[pair_start]
    pair_member = s_member[pair_start]
    pair_count = np.diff(np.r_[pair_start, len(s_label)])
    rng = np.random.default_rng(12345)
    h1 = rng.integers(1, 2**62, size=len(members), dtype=np.int64)
    h2 = rng.integers(1, 2**31, size=len(members), dtype=np.int64)
    with np.errstate(over="ignore"):
        pair_hash = h1[pair_member] * (pair_count + 1) + h2[pair_member] * pair_count
    unit_start = np.flatnonzero(np.r_[True, pair_label[1:] != pair_label[:-1]])
    with np.errstate(over="ignore"):
        unit_hash = np.add.reduceat(pair_hash, unit_start)
    unit_label = pair_label[unit_start]
    sig_ids, unit_sig = np.unique(unit_hash, return_inverse=True)

    seed_ids = {mid[m] for m in seed_set if m in mid}
    block_ids = {mid[m]: r for m, r in blocks.items() if m in mid}
    groups: list[Group] = []
    for sig in range(len(sig_ids)):
        units = np.flatnonzero(unit_sig == sig)
        first = units[0]
        lo = unit_start[first]
        hi = unit_start[first + 1] if first + 1 < len(unit_start) else len(pair_label)
        sig_members = [int(x) for x in pair_member[lo:hi]]
        if not seed_ids.intersection(sig_members):
            continue
        counts = [int(x) for x in pair_count[lo:hi]]
        per_unit = sum(counts)
        # atoms of these units in (unit, member, local) order: one row per unit
        sel = np.isin(s_label, unit_label[units])
        block = s_local[sel].reshape(len(units), per_unit)
        index: dict[Member, np.ndarray] = {}
        col = 0
        for mem, count in zip(sig_members, counts):
            index[members[mem]] = block[:, col:col + count]
            col += count
        groups.append(_make_group(view, len(groups), index, cache, seed_ids, mid, block_ids))
    groups.sort(key=lambda g: (g.position, g.id))
    for k, g in enumerate(groups):
        g.id = k
    return groups


def _member_order(view: GraphView):
    def key(m: Member):
        if m.slot.use is not None:
            return (m.slot.use[0], 1, m.slot.use[1], m.axis, m.slot.tensor)
        return (view.producer.get(m.slot.tensor, -1), 0, 0, m.axis, m.slot.tensor)
    return key


def _make_group(view: GraphView, gid: int, index: dict[Member, np.ndarray],
                cache: dict[int, NodeCoupling], seed_ids: set[int],
                mid: dict[Member, int], block_ids: dict[int, str]) -> Group:
    roles: dict[Member, str] = {}
    labels: dict[Member, str] = {}
    nodes: list[int] = []
    heads: list[tuple[int, int]] = []  # (head_dim, query heads per unit) from proofs
    for m in index:
        labels[m] = view.describe(m)
        for idx in view.nodes_touching(m.slot):
            nc = cache.get(idx)
            if nc is not None and m in nc.roles:
                roles[m] = nc.roles[m]
            if nc is not None and m in nc.heads:
                head_dim, per_head = nc.heads[m]
                heads.append((head_dim, max(int(index[m].shape[1]) // per_head, 1)))
            nodes.append(idx)
    seeds = [m for m in index if mid[m] in seed_ids]
    seed_nodes = sorted({view.producer[m.slot.tensor] for m in seeds
                         if m.slot.tensor in view.producer})
    # order units by their position on the first seed member (the source's channel order)
    anchor = seeds[0] if seeds else next(iter(index))
    order = np.argsort(index[anchor][:, 0], kind="stable")
    index = {m: v[order] for m, v in index.items()}
    src = view.nodes[seed_nodes[0]] if seed_nodes else None
    source = (src.name or src.output[0]) if src is not None else anchor.slot.tensor
    source_op = src.op_type if src is not None else ""
    blocked = [m for m in index if mid[m] in block_ids]
    reason = None
    if blocked:
        reason = barrier_reason(block_ids[mid[blocked[0]]], blocked[0])
        if len(blocked) > 1:
            reason += f" (and {len(blocked) - 1} more)"
    width = index[anchor].shape[1]
    if source_op in ("Conv", "ConvTranspose", "FusedConv"):
        kind = "channels"
        unit = "conv-group" if any(m.slot.is_virtual for m in index) else "channel"
    else:
        kind = "neurons" if width == 1 else "blocks"
        unit = "neuron" if width == 1 else "block"
    head_dim, per_unit = None, 1
    if heads:
        unit = "head"
        head_dim = heads[0][0]
        per_unit = max(p for _, p in heads)
    node_names = tuple(dict.fromkeys(view.nodes[i].name or view.nodes[i].output[0]
                                     for i in sorted(set(nodes))))
    source_nodes = tuple(view.nodes[i].name or view.nodes[i].output[0] for i in seed_nodes)
    return Group(gid, source, source_op, kind, int(index[anchor].shape[0]), index, roles,
                 not blocked, reason, labels, source_nodes, node_names,
                 seed_nodes[0] if seed_nodes else len(view.nodes), unit, head_dim, per_unit,
                 blocked[0] if blocked else None)
