"""Allocation under a budget: which units of every kind to remove so a cost target is met
with the least damage.

1. Costs (``node_costs``): per node, its MACs (``graphopt.analysis.cost``), or its measured
   time on an execution provider (``graphopt.prune.latency``: a width response measured at
   a few uniformly reduced widths, which replaces the linear share below for ``latency``);
   params are counted per weight slice. A unit's cost is what removing it saves: each node a
   group touches loses the unit's share of the axis it slices (``unit_costs``); a layer's is
   the sum over its nodes (``block_cost``).
2. Candidates (``Candidate``) carry a damage (from ``graphopt.prune.scores``, on one scale:
   relative squared error of the residual stream per token, see ``passes/prune.py``) and a
   cost. Width units come in *chunks* of ``step`` units in their group's removal order, so
   kept widths stay multiples of ``round_to`` channels.
3. ``allocate`` takes candidates by damage per unit of cost, lowest first, until the
   removed cost reaches ``need``: a group loses at most its ``cap`` units, in its own order
   (chunks of a group are taken in sequence); taking a layer removes its whole cost,
   minus what was already taken inside it, and its groups take nothing more. A layer that
   would pass the need by more than the largest width chunk is passed over while width
   chunks can still meet it, so the result overshoots the need by less than one width
   chunk's cost (one unit, or ``round_to`` of them); only when nothing else is left may a
   layer overshoot.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

logger = logging.getLogger(__name__)

METRICS = ("macs", "params", "latency")


@dataclass
class Candidate:
    kind: str  # "heads", "neurons", "channels" or "layers"
    key: int  # group id, or block position for layers
    units: tuple[int, ...]  # unit indices of the group (empty for a layer)
    damage: float
    cost: float
    order: int = 0  # position among the group's chunks
    layer: int | None = None  # the block position holding this group, if any


@dataclass
class Allocation:
    removal: dict[int, list[int]] = field(default_factory=dict)
    layers: list[int] = field(default_factory=list)
    removed_cost: float = 0.0


def node_macs(model: onnx.ModelProto, shapes: Mapping[str, tuple]) -> np.ndarray:
    from ..analysis.cost import _node_macs

    out = np.zeros(len(model.graph.node))
    for i, node in enumerate(model.graph.node):
        try:
            out[i] = float(_node_macs(node, shapes) or 0)
        except Exception:  # noqa: BLE001 - an op whose shapes are unknown counts 0
            out[i] = 0.0
    return out


def unit_shares(coupling, group, cost: np.ndarray | None, metric: str
                ) -> dict[object, float]:
    """The share of each cost item one unit of ``group`` removes: per node (its MACs or
    time) for ``macs``/``latency``, per weight tensor for ``params``."""
    view = coupling.view
    share: dict[object, float] = {}
    for m, idx in group.index.items():
        if metric == "params":
            if not m.slot.is_const:
                continue
            value = view.const(m.slot.tensor)
            if value is None or not np.issubdtype(value.dtype, np.floating) or value.size < 2:
                continue
            dim = coupling.dims.get(m) or value.shape[m.axis]
            key = ("tensor", m.slot.tensor)
            share[key] = share.get(key, 0.0) + idx.shape[1] / dim
            continue
        dim = coupling.dims.get(m)
        if not dim:
            continue
        for n in view.nodes_touching(m.slot):
            if cost is not None and n < len(cost):
                share[n] = max(share.get(n, 0.0), idx.shape[1] / dim)
    return share


def item_costs(coupling, cost: np.ndarray | None, metric: str) -> dict[object, float]:
    """What each cost item of ``unit_shares`` is worth."""
    if metric != "params":
        return {n: float(c) for n, c in enumerate(cost)}
    view = coupling.view
    out: dict[object, float] = {}
    for init in view.model.graph.initializer:
        out[("tensor", init.name)] = float(math.prod(init.dims))
    for node in view.model.graph.node:
        if node.op_type == "Constant" and node.output:
            value = view.const(node.output[0])
            if value is not None:
                out[("tensor", node.output[0])] = float(value.size)
    return out


def unit_costs(coupling, group, cost: np.ndarray | None, metric: str) -> float:
    """What removing one unit of ``group`` saves (module doc, 1)."""
    items = item_costs(coupling, cost, metric) if metric == "params" else None
    total = 0.0
    for key, s in unit_shares(coupling, group, cost, metric).items():
        total += (items.get(key, 0.0) if items is not None else float(cost[key])) * s
    return total


def exact_removed(items: Mapping[object, float], shares: Mapping[int, Mapping[object, float]],
                  removal: Mapping[int, Sequence[int]], dead: set) -> float:
    """What a cut really removes: an item (node, weight) touched by several cut groups keeps
    the product of their kept shares (a conv losing half its inputs and half its outputs
    keeps a quarter, not zero, which the sum of unit costs would say); ``dead`` items (in
    removed layers) go whole."""
    kept = kept_fractions(shares, {g: len(u) for g, u in removal.items()})
    total = sum(items.get(key, 0.0) for key in dead)
    total += sum(items.get(key, 0.0) * (1.0 - f) for key, f in kept.items() if key not in dead)
    return total


def kept_fractions(shares: Mapping[int, Mapping[object, float]],
                   counts: Mapping[int, int]) -> dict[object, float]:
    """Cost item -> product over cut groups of ``1 - removed units * share``."""
    kept: dict[object, float] = {}
    for gid, k in counts.items():
        for key, s in shares.get(gid, {}).items():
            kept[key] = kept.get(key, 1.0) * max(0.0, 1.0 - k * s)
    return kept


def block_items(model: onnx.ModelProto, nodes: Sequence[int], metric: str) -> set:
    """The cost items (``unit_shares`` keys) a removed block takes with it: its nodes, or
    for ``params`` the float weights only its nodes read."""
    if metric != "params":
        return set(nodes)
    inside = set(nodes)
    readers: dict[str, set[int]] = {}
    for i, node in enumerate(model.graph.node):
        for name in node.input:
            readers.setdefault(name, set()).add(i)
    out = set()
    for init in model.graph.initializer:
        if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                              onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE):
            users = readers.get(init.name, set())
            if users and users <= inside and math.prod(init.dims) > 1:
                out.add(("tensor", init.name))
    return out


def block_cost(model: onnx.ModelProto, nodes: Sequence[int], cost: np.ndarray | None,
               metric: str) -> float:
    if metric != "params":
        return float(sum(cost[n] for n in nodes if n < len(cost)))
    sizes = {init.name: math.prod(init.dims) for init in model.graph.initializer}
    return float(sum(sizes[name] for _, name in block_items(model, nodes, metric)))


def allocate(candidates: Sequence[Candidate], need: float) -> Allocation:
    """The cheapest-damage set whose cost reaches ``need`` (module doc, 3)."""
    out = Allocation()
    next_chunk: dict[int, int] = {}
    pending = sorted(candidates, key=lambda c: (c.damage / max(c.cost, 1e-30), c.order))
    dead_layers: set[int] = set()
    taken_in_layer: dict[int, float] = {}
    # a candidate may pass the need by at most one width chunk's cost; one that would pass
    # it by more (a whole layer near the end) waits, and is taken only if nothing else can
    # meet the need
    slack = max((c.cost for c in candidates if c.kind != "layers"), default=0.0)
    strict = True
    progress = True
    while out.removed_cost < need and progress:
        progress = False
        for c in pending:
            if out.removed_cost >= need:
                break
            if c.kind == "layers":
                if c.key in dead_layers:
                    continue
                gain = c.cost - taken_in_layer.get(c.key, 0.0)
                if strict and out.removed_cost + gain > need + slack:
                    continue
                dead_layers.add(c.key)
                out.layers.append(c.key)
                out.removed_cost += c.cost - taken_in_layer.get(c.key, 0.0)
                progress = True
                continue
            if c.layer is not None and c.layer in dead_layers:
                continue
            if next_chunk.get(c.key, 0) != c.order:
                continue  # an earlier chunk of this group is still waiting
            next_chunk[c.key] = c.order + 1
            out.removal.setdefault(c.key, []).extend(c.units)
            out.removed_cost += c.cost
            if c.layer is not None:
                taken_in_layer[c.layer] = taken_in_layer.get(c.layer, 0.0) + c.cost
            progress = True
        pending = [c for c in pending if not _used(c, out, next_chunk, dead_layers)]
        if not progress and strict and out.removed_cost < need:
            strict, progress = False, True
    for layer in out.layers:  # units of removed layers go with their layer
        for c in candidates:
            if c.layer == layer:
                out.removal.pop(c.key, None)
    return out


def _used(c: Candidate, out: Allocation, next_chunk, dead_layers) -> bool:
    if c.kind == "layers":
        return c.key in dead_layers
    return next_chunk.get(c.key, 0) > c.order or (c.layer is not None and c.layer in dead_layers)


def chunks(order: np.ndarray, scores: np.ndarray, unit_cost: float, cap: int, step: int,
           size: int) -> list[tuple[tuple[int, ...], float, float]]:
    """(units, damage, cost) chunks of a group in its removal order: the first chunk makes
    the kept count a multiple of ``step``, the rest are ``step`` units; at most ``cap``
    units in all. Damage of a chunk is its units' largest score (scores rise along the
    order)."""
    out = []
    first = size % step
    pos = 0
    sizes = ([first] if first else []) + [step] * (size // step)
    for n in sizes:
        if pos + n > cap:
            break
        units = order[pos:pos + n]
        out.append((tuple(int(u) for u in units), float(np.sum(scores[units])),
                    unit_cost * n))
        pos += n
    return out
