"""Stream statistics the ``prune`` pass scales its damages by (``passes/prune.py``).

- ``stream_norms``: for each consumer of the groups, the mean row energy (tokens, pixels;
  padding left out) of the residual stream its output joins (``stream_tensor``: along
  single-reader elementwise/layout ops to the first sum of two activations), so OBS
  damage becomes a relative error of the stream; with ``weights`` (post-norm rows,
  ``graphopt.prune.postnorm``) each row counts by 1 / its variance, as the norm sees it.
- ``layer_damage``: E‖exit − entry‖² / E‖exit‖² per removable block, what bypassing it
  costs on the same scale.
- ``stream_stats``: both from one capture (one run of the model over the feeds).
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
    return stream_stats(model, coupling, groups, feeds, weights)[0]


def stream_stats(model, coupling, groups, feeds, weights=None, blocks=()
                 ) -> tuple[dict[str, float], dict[str, float]]:
    """``stream_norms`` and ``layer_damage`` of ``blocks`` from one capture (one run of
    the model over the feeds instead of two)."""
    consts = set(constants(model))
    inits = constants(model)
    streams: dict[str, str] = {}
    for g in groups:
        for m in g.members_with_role("in"):
            site, _ = site_for(model, m.slot.use[0], inits)
            if site is not None:
                streams[site.output] = stream_tensor(model, site.output, consts)
    streams.update(weights or {})
    feeds = list(feeds)
    energy = _RowEnergy(sorted(set(streams.values())), feeds,
                        set((weights or {}).values()))
    layers = _LayerDiff([(b.entry, b.exit) for b in blocks], feeds)
    names = list(dict.fromkeys(energy.names + layers.names))
    if names:
        def reduce(name, value):
            if name in energy.wanted:
                energy(name, value)
            if name in layers.wanted:
                layers(name, value)

        capture(model, feeds, names, reduce, batch_outputs=len(names))
    return ({s: energy.mean(t) for s, t in streams.items()},
            {b: layers.damage(a, b) for a, b in layers.pairs})


class _RowEnergy:
    """Mean over rows (tokens, pixels; padding left out) of the squared norm along the
    channel axis, for tensors captured in one session (feed by feed, ``names`` order);
    rows of the ``weighted`` tensors count by 1 / their variance over the last axis."""

    def __init__(self, names, feeds, weighted=()):
        self.names = list(names)
        self.wanted = set(self.names)
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
    return stream_stats(model, None, (), feeds, blocks=blocks)[1]


class _LayerDiff:
    """Sums of ‖exit − entry‖² and ‖exit‖² over real tokens per (entry, exit) pair, for
    tensors captured in one session (feed by feed; a feed is complete once every name of
    ``pairs`` was seen)."""

    def __init__(self, pairs, feeds):
        self.pairs = list(pairs)
        self.names = list(dict.fromkeys(n for p in self.pairs for n in p))
        self.wanted = set(self.names)
        self.feeds = list(feeds)
        self.diff = {p: 0.0 for p in self.pairs}
        self.energy = {p: 0.0 for p in self.pairs}
        self.current: dict[str, np.ndarray] = {}
        self.feed = 0

    def __call__(self, name, value):
        self.current[name] = np.asarray(value, dtype=np.float64)
        if len(self.current) < len(self.names):
            return
        mask = token_mask(self.feeds[self.feed])
        for a, b in self.pairs:
            x, y = self.current[a], self.current[b]
            axis = 1 if y.ndim == 4 else -1
            d = ((y - x) ** 2).sum(axis)
            e = (y * y).sum(axis)
            if mask is not None and d.ndim >= 2 and d.shape[:2] == mask.shape:
                w = mask.reshape(mask.shape + (1,) * (d.ndim - 2))
                d, e = d * w, e * w
            self.diff[(a, b)] += float(d.sum())
            self.energy[(a, b)] += float(e.sum())
        self.current.clear()
        self.feed += 1

    def damage(self, a, b) -> float:
        return self.diff[(a, b)] / max(self.energy[(a, b)], 1e-30)
