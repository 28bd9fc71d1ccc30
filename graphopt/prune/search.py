"""``prune``'s search round (``search=N``): allocation damages rescaled by measured damage.

1. ``rescale``: each group with readable consumers is probed at what the allocation took
   from it (at least a quarter of what it may lose: the first units of its removal order),
   each removable layer bypassed whole (``graphopt.prune.sensitivity.measure``) unless
   it is priced past ``LAYER_REACH`` times the dearest chunk the allocation takes; every
   candidate's damage is multiplied by its group's (or layer's) measured over predicted
   damage (``scaled``), and a group that could not be probed by the median factor of its
   kind. Past the units a group was probed at, a chunk is scaled by at least 1: a factor
   near 0 (the probe changed nothing measurable: PP-OCR channel groups at the logits,
   ×0.0003) says nothing about the units after it. A later round (``SearchState``: what
   was measured so far) probes again only the groups now cut past their probe, each at
   its new cut, and rescales the scores' damages (not the last round's) by the newest
   measurement. ``subset`` (``probe_feeds=N``, ``probe_subset``): the probes run on N of
   the given feeds, not their swapped copies; the compensation is solved on all. By
   default the fewest feeds holding ``PROBE_SAMPLES`` samples (MiniLM: 8 feeds of 8
   sentences; the PP-OCR classifier: 4 of 16 images, 98.83 % / 95.31 % top-1 at macs=0.8 /
   0.6 against 98.05 % / 96.48 % on all 8). MiniLM macs=0.6 on the mirror: the factors of
   4 feeds are those of 12 to ±0.1 and give the same cut (search6 notes). Each probe runs
   only the graph after its edit (``graphopt.prune.suffix``), compensated with the scores'
   own damped inverses.
   Whether ``prune`` runs a round by default (``search=auto``): ``graphopt.prune.search_work``.
2. ``fold_ids``: ``folds=N`` cross-fits the probes over N folds of the calibration; the
   swapped-token copies (``graphopt.data.vary``) follow the ``given`` feeds in order, and
   each copy stays in its original's fold, so no sentence is fit in one fold and measured
   in another.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from ..data.gram import constants
from .budget import Candidate
from .scores import _consumers
from .sensitivity import Probe, measure


LAYER_REACH = 8.0
PROBE_SAMPLES = 64


def fold_ids(count: int, given: int, folds: int) -> list[int] | None:
    """Fold of each of ``count`` feeds (module doc, 2); None for one fold or too few feeds."""
    if folds <= 1 or given < folds:
        return None
    return [(i % given) % folds for i in range(count)]


def probe_subset(count: int, given: int, wanted: int | None,
                 sizes: Sequence[int] = ()) -> list[int] | None:
    """``wanted`` of the ``given`` feeds (not their swapped-token copies), spread evenly;
    None (every one of the ``count`` feeds) for ``wanted`` 0 or at least ``count``.
    ``wanted`` None: as many as hold ``PROBE_SAMPLES`` samples (``sizes``: each given
    feed's batch; module doc, 1)."""
    if wanted is None:
        wanted, held = 0, 0
        for n in sizes[:given] or [1] * given:
            if held >= PROBE_SAMPLES:
                break
            wanted, held = wanted + 1, held + n
    if wanted <= 0 or wanted >= count:
        return None
    if wanted >= given:
        return list(range(given))
    return sorted(set(np.linspace(0, given - 1, wanted).round().astype(int).tolist()))


def feed_samples(feeds) -> list[int]:
    """Each feed's batch (the first axis of its first input; 1 for a scalar)."""
    return [int(np.shape(next(iter(f.values())))[0]) if f and np.ndim(next(iter(f.values())))
            else 1 for f in feeds]


@dataclass
class SearchState:
    """What the rounds measured: per probe key (("group", id) or ("layer", position)) the
    units probed (0 for a layer), the measured and the scores' predicted damage; and the
    last round's note."""

    probed: dict = field(default_factory=dict)
    note: str = ""  # the last round's note (the factors)


def rescale(model, coupling, groups, blocks, candidates: Sequence[Candidate], alloc, feeds,
            kinds: Mapping[int, str], damping: float, weights: Mapping[str, str] | None,
            folds: Sequence[int] | None, inverses=None, subset=None,
            state: SearchState | None = None, beyond: str = "one"
            ) -> tuple[list[Candidate], str]:
    """Candidates with measured damages (module doc, 1) and the report's note.
    ``candidates``: the scores' damages (not those of an earlier round). ``state``: what
    earlier rounds measured; a round probes only the groups not probed yet or cut now past
    what was probed, each layer once."""
    state = state if state is not None else SearchState()
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
    probes, predicted, size = [], {}, {}
    for gid, chunks_ in by_group.items():
        if gid not in consumers:
            continue
        chunks_.sort(key=lambda c: c.order)
        taken = len(alloc.removal.get(gid, ()))
        seen = state.probed.get(("group", gid))
        if seen is not None and taken <= seen[0]:
            continue
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
            size[("group", gid)] = len(units)
    # a layer is probed when the search could bring it into the cut: priced at most
    # LAYER_REACH times the dearest unit chunk the allocation takes (factors seen: 0.3-5)
    taken = [c.damage / max(c.cost, 1e-30) for c in candidates if c.kind != "layers"
             and c.units and set(c.units) <= set(alloc.removal.get(c.key, ()))]
    reach = LAYER_REACH * max(taken, default=math.inf)
    for c in candidates:
        if c.kind == "layers" and c.damage > 0 and ("layer", c.key) not in state.probed \
                and (c.key in alloc.layers or c.damage / max(c.cost, 1e-30) <= reach):
            block = next(b for b, i in blocks if i == c.key)
            probes.append(Probe(("layer", c.key), block=block))
            predicted[("layer", c.key)] = c.damage
            size[("layer", c.key)] = 0
    measured = measure(model, coupling, probes, feeds, consumers, damping, weights=weights,
                       folds=folds, inverses=inverses, subset=None if folds else subset)
    for k, m in measured.items():
        state.probed[k] = (size[k], m, predicted[k])
    out = scaled(candidates, state, kinds, beyond)
    ratio = {k: m / p for k, (_, m, p) in state.probed.items()}
    note = ("damage scaled by measured output damage per group"
            + (f" (cross-fitted over {len(set(folds))} folds)" if folds else "") + ": "
            + ", ".join(f"{kinds.get(k[1], 'layer') if k[0] == 'group' else 'layer'} {k[1]} "
                        f"×{r:.2g}" + (f" at {state.probed[k][0]}" if k[0] == "group" else "")
                        for k, r in sorted(ratio.items())))
    state.note = note
    return out, note


def scaled(candidates: Sequence[Candidate], state: SearchState, kinds: Mapping[int, str],
           beyond: str = "one") -> list[Candidate]:
    """``candidates`` (the scores' damages) times their group's measured over predicted
    damage (module doc, 1). A chunk past the units its group was probed at is scaled by at
    least 1 (``beyond="one"``; ``"median"``: at least its kind's median factor; ``"f"``: the
    group's own factor however far): a factor near 0 (the probe's cut changed nothing
    measurable) says nothing about the units after it."""
    ratio = {k: m / p for k, (_, m, p) in state.probed.items()}
    kind_of = {k: ("layers" if k[0] == "layer" else kinds[k[1]]) for k in ratio}
    median = {kind: float(np.median([r for k, r in ratio.items() if kind_of[k] == kind]))
              for kind in set(kind_of.values())}
    fallback = float(np.median(list(ratio.values()))) if ratio else 1.0
    out, done = [], {}
    for c in sorted(candidates, key=lambda c: (c.kind == "layers", c.key, c.order)):
        key = ("layer", c.key) if c.kind == "layers" else ("group", c.key)
        f = ratio.get(key, median.get(c.kind, fallback))
        if key in state.probed and c.kind != "layers":
            done[key] = done.get(key, 0) + len(c.units)
            if done[key] > state.probed[key][0]:  # past what was measured
                f = {"f": f, "one": max(f, 1.0),
                     "median": max(f, median.get(c.kind, fallback))}[beyond]
        out.append(replace(c, damage=c.damage * f))
    return out
