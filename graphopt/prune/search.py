"""``prune``'s search round (``search=N``): allocation damages rescaled by measured damage.

1. ``rescale``: each group with readable consumers is probed at what the allocation took
   from it (at least a quarter of what it may lose: the first units of its removal order),
   each removable layer bypassed whole (``graphopt.prune.sensitivity.measure``); every
   candidate's damage is multiplied by its group's (or layer's) measured over predicted
   damage, and a group that could not be probed by the median factor of its kind.
2. ``fold_ids``: ``folds=N`` cross-fits the probes over N folds of the calibration; the
   swapped-token copies (``graphopt.data.vary``) follow the ``given`` feeds in order, and
   each copy stays in its original's fold, so no sentence is fit in one fold and measured
   in another.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np

from ..data.gram import constants
from .budget import Candidate
from .scores import _consumers
from .sensitivity import Probe, measure


def fold_ids(count: int, given: int, folds: int) -> list[int] | None:
    """Fold of each of ``count`` feeds (module doc, 2); None for one fold or too few feeds."""
    if folds <= 1 or given < folds:
        return None
    return [(i % given) % folds for i in range(count)]


def rescale(model, coupling, groups, blocks, candidates: Sequence[Candidate], alloc, feeds,
            kinds: Mapping[int, str], damping: float, weights: Mapping[str, str] | None,
            folds: Sequence[int] | None) -> tuple[list[Candidate], str]:
    """Candidates with measured damages (module doc, 1) and the report's note."""
    inits = constants(model)
    consumers = {}
    for g in groups:
        found = _consumers(model, coupling, g, inits)
        if found is not None:
            consumers[g.id] = found
    by_group: dict[int, list[Candidate]] = {}
    for c in candidates:
        if c.kind != "layers":
            by_group.setdefault(c.key, []).append(c)
    probes, predicted = [], {}
    for gid, chunks_ in by_group.items():
        if gid not in consumers:
            continue
        chunks_.sort(key=lambda c: c.order)
        taken = len(alloc.removal.get(gid, ()))
        cap = sum(len(c.units) for c in chunks_)
        want = max(taken, min(cap, math.ceil(0.25 * coupling.group(gid).size)))
        units, dmg = [], 0.0
        for c in chunks_:
            if len(units) >= want:
                break
            units += list(c.units)
            dmg += c.damage
        if units and dmg > 0:
            probes.append(Probe(("group", gid), np.asarray(units)))
            predicted[("group", gid)] = dmg
    for c in candidates:
        if c.kind == "layers" and c.damage > 0:
            block = next(b for b, i in blocks if i == c.key)
            probes.append(Probe(("layer", c.key), block=block))
            predicted[("layer", c.key)] = c.damage
    measured = measure(model, coupling, probes, feeds, consumers, damping, weights=weights,
                       folds=folds)
    ratio = {k: measured[k] / predicted[k] for k in measured}
    kind_of = {k: ("layers" if k[0] == "layer" else kinds[k[1]]) for k in ratio}
    median = {kind: float(np.median([r for k, r in ratio.items() if kind_of[k] == kind]))
              for kind in set(kind_of.values())}
    fallback = float(np.median(list(ratio.values()))) if ratio else 1.0
    out = []
    for c in candidates:
        key = ("layer", c.key) if c.kind == "layers" else ("group", c.key)
        out.append(replace(c, damage=c.damage * ratio.get(key, median.get(c.kind, fallback))))
    note = ("damage scaled by measured output damage per group"
            + (f" (cross-fitted over {len(set(folds))} folds)" if folds else "") + ": "
            + ", ".join(f"{kinds.get(k[1], 'layer') if k[0] == 'group' else 'layer'} {k[1]} "
                        f"×{r:.2g}" for k, r in sorted(ratio.items())))
    return out, note
