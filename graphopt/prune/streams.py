"""Stream statistics the ``prune`` pass scales its damages by (``passes/prune.py``).

- ``stream_norms``: for each consumer of the groups, the mean row energy (tokens, pixels;
  padding left out) of the residual stream its output joins (``stream_tensor``: along
  single-reader elementwise/layout ops to the first sum of two activations), so OBS
  damage becomes a relative error of the stream; with ``weights`` (post-norm rows,
  ``graphopt.prune.postnorm``) each row counts by 1 / its variance, as the norm sees it.
- ``layer_damage``: E‖exit − entry‖² / E‖exit‖² per removable block, what bypassing it
  costs on the same scale.
- ``stream_stats``: both from one capture (one run of the model over the feeds);
  ``graphopt.prune.shared.scores``: both from the pruning scores' own capture runs.
- ``consumer_outputs``: the output tensors of the weight layers that read the groups.
"""

from __future__ import annotations

from collections.abc import Mapping

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
    stats = StreamStats(model, groups, feeds, weights, blocks)
    stats.capture(model)
    return stats.norms(), stats.damage()


class StreamStats(Mapping):
    """``stream_norms`` and ``layer_damage`` from tensors handed over feed by feed
    (``observe``, e.g. as ``graphopt.data.gram.accumulate``'s ``observe`` while the pruning
    scores capture the same model: no run of their own). ``names``: the tensors wanted.
    As a mapping it is ``norms()``: its keys are known at once, each value is read from
    what was observed when it is looked up (``graphopt.prune.scores.data_scores`` looks
    them up after its captures)."""

    def __init__(self, model, groups, feeds, weights=None, blocks=()):
        inits = constants(model)
        consts = set(inits)
        self.streams: dict[str, str] = {}
        for g in groups:
            for m in g.members_with_role("in"):
                site, _ = site_for(model, m.slot.use[0], inits)
                if site is not None:
                    self.streams[site.output] = stream_tensor(model, site.output, consts)
        self.streams.update(weights or {})
        feeds = list(feeds)
        self.energy = _RowEnergy(sorted(set(self.streams.values())), feeds,
                                 set((weights or {}).values()))
        self.layers = _LayerDiff([(b.entry, b.exit) for b in blocks], feeds)
        self.names = list(dict.fromkeys(self.energy.names + self.layers.names))
        self.feeds = feeds
        self.seen = 0  # tensors handed over so far

    @property
    def complete(self) -> bool:
        """Every name was handed over for every feed."""
        return self.seen == len(self.names) * len(self.feeds)

    def capture(self, model) -> None:
        """Run the model over the feeds for the names (one session), unless they were all
        observed already; a part observed is dropped and taken again."""
        if self.complete or not self.names:
            return
        if self.seen:
            self.energy.clear()
            self.layers.clear()
            self.seen = 0
        per_feed = len(self.names)
        calls = [0]

        def reduce(name, value):  # one session: every name once per feed, in feed order
            self.observe(calls[0] // per_feed, name, value)
            calls[0] += 1

        capture(model, self.feeds, self.names, reduce, batch_outputs=per_feed)

    def observers(self) -> dict:
        """``{name: take(feed_index, array)}``, as ``accumulate``'s ``observe`` hands over."""
        return {n: (lambda f, v, n=n: self.observe(f, n, v)) for n in self.names}

    def observe(self, feed: int, name: str, value) -> None:
        self.seen += 1
        if name in self.energy.wanted:
            self.energy.add(feed, name, value)
        if name in self.layers.wanted:
            self.layers.add(feed, name, value)

    def __getitem__(self, site: str) -> float:
        return self.energy.mean(self.streams[site])

    def __iter__(self):
        return iter(self.streams)

    def __len__(self) -> int:
        return len(self.streams)

    def norms(self) -> dict[str, float]:
        """Consumer site output -> mean row energy of its stream (``stream_norms``)."""
        return {s: self.energy.mean(t) for s, t in self.streams.items()}

    def damage(self) -> dict[str, float]:
        """Block exit -> E‖exit − entry‖² / E‖exit‖² (``layer_damage``)."""
        return {b: self.layers.damage(a, b) for a, b in self.layers.pairs}


class _RowEnergy:
    """Mean over rows (tokens, pixels; padding left out) of the squared norm along the
    channel axis, per tensor, from tensors handed over with their feed's index; rows of
    the ``weighted`` tensors count by 1 / their variance over the last axis."""

    def __init__(self, names, feeds, weighted=()):
        self.names = list(names)
        self.wanted = set(self.names)
        self.weighted = set(weighted)
        self.feeds = list(feeds)
        self.clear()

    def clear(self):
        self.sums: dict[str, float] = {}
        self.rows: dict[str, float] = {}

    def add(self, f, name, value):
        feed = self.feeds[f]
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
    """Sums of ‖exit − entry‖² and ‖exit‖² over real tokens per (entry, exit) pair, from
    tensors handed over with their feed's index; a tensor is held (as given) only until
    every pair of its feed that reads it has both of its ends."""

    def __init__(self, pairs, feeds):
        self.pairs = list(pairs)
        self.names = list(dict.fromkeys(n for p in self.pairs for n in p))
        self.wanted = set(self.names)
        self.feeds = list(feeds)
        self.clear()

    def clear(self):
        self.diff = {p: 0.0 for p in self.pairs}
        self.energy = {p: 0.0 for p in self.pairs}
        self.held: dict[int, dict[str, np.ndarray]] = {}
        self.done: dict[int, set] = {}

    def add(self, f, name, value):
        held = self.held.setdefault(f, {})
        done = self.done.setdefault(f, set())
        held[name] = value
        mask = token_mask(self.feeds[f])
        for a, b in self.pairs:
            if (a, b) in done or a not in held or b not in held:
                continue
            x = np.asarray(held[a], dtype=np.float64)
            y = np.asarray(held[b], dtype=np.float64)
            axis = 1 if y.ndim == 4 else -1
            d = ((y - x) ** 2).sum(axis)
            e = (y * y).sum(axis)
            if mask is not None and d.ndim >= 2 and d.shape[:2] == mask.shape:
                w = mask.reshape(mask.shape + (1,) * (d.ndim - 2))
                d, e = d * w, e * w
            self.diff[(a, b)] += float(d.sum())
            self.energy[(a, b)] += float(e.sum())
            done.add((a, b))
        for t in list(held):
            if all(p in done for p in self.pairs if t in p):
                del held[t]

    def damage(self, a, b) -> float:
        return self.diff[(a, b)] / max(self.energy[(a, b)], 1e-30)
