"""Stream statistics the ``prune`` pass scales its damages by (``passes/prune.py``).

- ``stream_norms``: for each consumer of the groups, the mean row energy (tokens, pixels;
  padding left out) of the residual stream its output joins (``stream_tensor``: along
  single-reader elementwise/layout ops to the first sum of two activations), so OBS
  damage becomes a relative error of the stream; with ``weights`` (post-norm rows,
  ``graphopt.prune.postnorm``) each row counts by 1 / its variance, as the norm sees it.
- ``layer_damage``: E‖exit − entry‖² / E‖exit‖² per removable block, what bypassing it
  costs on the same scale.
- ``consumer_outputs``: the output tensors of the weight layers that read the groups.
"""

from __future__ import annotations

import numpy as np
import onnx

from ..data.calibration import capture
from ..data.gram import constants, site_for, token_mask


def stream_tensor(model: onnx.ModelProto, name: str, consts: set[str]) -> str:
    """The residual sum a site's output joins: along single-reader elementwise/layout ops
    (a bias Add) to the first op adding two activations; where the walk ends otherwise (a
    branch, a norm, an activation), the tensor reached so far."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for x in node.input:
            readers.setdefault(x, []).append(node)
    current = name
    for _ in range(8):
        nodes = readers.get(current, [])
        if len(nodes) != 1:
            return current
        node = nodes[0]
        acts = [x for x in node.input if x and x not in consts]
        if node.op_type in ("Add", "Sum") and len(acts) >= 2:
            return node.output[0]
        if node.op_type not in ("Add", "Sub", "Mul", "Div", "Reshape", "Transpose",
                                "Identity", "Cast"):
            return current
        current = node.output[0]
    return current


def consumer_outputs(model, groups) -> list[str]:
    inits = constants(model)
    out = []
    for g in groups:
        for m in g.members_with_role("in"):
            site, _ = site_for(model, m.slot.use[0], inits)
            if site is not None:
                out.append(site.output)
    return list(dict.fromkeys(out))


def stream_norms(model, coupling, groups, feeds, weights=None) -> dict[str, float]:
    """Mean row energy of the stream each consumer of ``groups`` joins; ``weights``
    (site output -> stream): that stream's rows weighted by 1 / their variance."""
    consts = set(constants(model))
    inits = constants(model)
    streams: dict[str, str] = {}
    for g in groups:
        for m in g.members_with_role("in"):
            site, _ = site_for(model, m.slot.use[0], inits)
            if site is not None:
                streams[site.output] = stream_tensor(model, site.output, consts)
    streams.update(weights or {})
    names = sorted(set(streams.values()))
    reducer = _RowEnergy(names, feeds, set((weights or {}).values()))
    capture(model, feeds, names, reducer, batch_outputs=max(len(names), 1))
    return {s: reducer.mean(t) for s, t in streams.items()}


class _RowEnergy:
    """Mean over rows (tokens, pixels; padding left out) of the squared norm along the
    channel axis, for tensors captured in one session (feed by feed, ``names`` order);
    rows of the ``weighted`` tensors count by 1 / their variance over the last axis."""

    def __init__(self, names, feeds, weighted=()):
        self.names = list(names)
        self.weighted = set(weighted)
        self.feeds = list(feeds)
        self.calls = 0
        self.sums: dict[str, float] = {}
        self.rows: dict[str, float] = {}

    def __call__(self, name, value):
        feed = self.feeds[min(self.calls // max(len(self.names), 1), len(self.feeds) - 1)]
        self.calls += 1
        v = np.asarray(value, dtype=np.float64)
        energy = (v * v).sum(1 if v.ndim == 4 else -1)
        if name in self.weighted:
            var = v.var(-1)
            energy = energy / np.maximum(var, 1e-6 * max(float(var.mean()), 1e-30))
        mask = token_mask(feed)
        w = np.ones_like(energy)
        if mask is not None and energy.ndim >= 2 and energy.shape[:2] == mask.shape:
            w = np.broadcast_to(mask.reshape(mask.shape + (1,) * (energy.ndim - 2)),
                                energy.shape).astype(np.float64)
        self.sums[name] = self.sums.get(name, 0.0) + float((energy * w).sum())
        self.rows[name] = self.rows.get(name, 0.0) + float(w.sum())

    def mean(self, name) -> float:
        return self.sums.get(name, 0.0) / max(self.rows.get(name, 0.0), 1.0) or 1.0


def layer_damage(model, blocks, feeds) -> dict[str, float]:
    """E‖exit − entry‖² / E‖exit‖² per block (keyed by exit), over real tokens."""
    pairs = [(b.entry, b.exit) for b in blocks]
    names = list(dict.fromkeys(n for p in pairs for n in p))
    feeds = list(feeds)
    diff = {p: 0.0 for p in pairs}
    energy = {p: 0.0 for p in pairs}
    current: dict[str, np.ndarray] = {}
    state = {"feed": 0}

    def reduce(name, value):
        current[name] = np.asarray(value, dtype=np.float64)
        if len(current) < len(names):
            return
        mask = token_mask(feeds[state["feed"]])
        for a, b in pairs:
            x, y = current[a], current[b]
            axis = 1 if y.ndim == 4 else -1
            d = ((y - x) ** 2).sum(axis)
            e = (y * y).sum(axis)
            if mask is not None and d.ndim >= 2 and d.shape[:2] == mask.shape:
                w = mask.reshape(mask.shape + (1,) * (d.ndim - 2))
                d, e = d * w, e * w
            diff[(a, b)] += float(d.sum())
            energy[(a, b)] += float(e.sum())
        current.clear()
        state["feed"] += 1

    capture(model, feeds, names, reduce, batch_outputs=len(names))
    return {b: diff[(a, b)] / max(energy[(a, b)], 1e-30) for a, b in pairs}
