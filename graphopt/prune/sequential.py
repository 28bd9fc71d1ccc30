"""Sequential selection (``prune``'s ``select=sequential``): which units of each group the cut
takes, chosen level by level on the inputs the already cut and refit prefix gives (SlimGPT,
SparseGPT), instead of once on the original's activations (``select=once``).

The allocation (``graphopt.prune.budget``) gives each group its count; the counts stay, so the
budget is met as allocated. The groups are then visited in the dependency order of their
consumer sites (``reconstruct._levels``). At each level, on a working copy of the model whose
earlier levels are already cut and refit:

1. the consumers' full-width inputs are captured (Gram sums, ``graphopt.data.gram.accumulate``)
   with targets from the original model (the residual stream's with ``streams``: what the
   refit after the cut fits), so a consumer sees the error the earlier cuts left;
2. each consumer is refit at full width toward that target (``reconstruct.solve``, damped
   toward its current weights), and the greedy OBS of ``graphopt.prune.scores`` removes the
   group's count of units from that refit. The damped objective is quadratic with Hessian
   H + D and minimum at the full-width refit, so OBS on H + D prices each removal exactly as
   the damped refit on the kept rows will: a unit an earlier cut made redundant (or
   expressible by the others or the bias) goes first;
3. the level's sites are refit on their kept rows and written back with zero rows for the
   cut units (the cut, by masked equivalence), and the next level is captured.

``prune``'s ``run`` then applies the cut and refits as always (the same refit, on the real
cut). A group read by several consumers sums their damages, each divided by its target's
energy; groups whose consumers are not all weight-layer sites (grouped convs) and groups
inside removed layers keep the one-shot choice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from ..data.gram import GramStats, accumulate, constants, site_for
from ..data.segments import Segments
from .blocks import remove_blocks
from .budget import Candidate
from .reconstruct import _levels, _SiteEdit, frontier_sites, solve, stream_sums
from .scores import _consumers, _obs_greedy


def select(model: onnx.ModelProto, coupling, removal: Mapping[int, Sequence[int]],
           feeds: Sequence[Mapping[str, np.ndarray]], *, damping: float = 0.1,
           streams: bool = True, weights: Mapping[str, str] | None = None,
           blocks: Sequence = (), remaining: "Remaining | None" = None
           ) -> tuple[dict[int, np.ndarray], str]:
    """The units to cut per group id (same counts as ``removal``, unless ``remaining``
    re-allocates them level by level) and a report line.

    ``weights``: post-norm row weights (``accumulate``'s); ``blocks``: the layers the cut
    removes (bypassed in the working copy first)."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    inits = constants(model)
    gone = {o for b in blocks for i in b.nodes for o in model.graph.node[i].output}
    made = {o for n in model.graph.node for o in n.output if o and o not in gone}
    plan: dict[int, list[tuple[str, np.ndarray]]] = {}
    for gid, units in removal.items():
        if not len(units) and (remaining is None or gid not in remaining.groups):
            continue
        consumers = _consumers(model, coupling, coupling.group(gid), inits)
        if consumers is None or any(s.output not in made for s, _ in consumers):
            continue
        plan[gid] = [(s.output, rows) for s, rows in consumers]
    for gid in set(remaining.groups if remaining is not None else ()) - set(plan):
        remaining.fix(gid, len(removal.get(gid, ())))  # not chosen here: as allocated
    _mask_fixed(work, coupling, {g: u for g, u in removal.items() if len(u) and g not in plan})
    if blocks:
        remove_blocks(work, blocks)
    chosen = {g: np.sort(np.asarray(u, dtype=np.int64)) for g, u in removal.items()}
    if not plan:
        return chosen, "select=sequential: no group has weight-layer consumers; one-shot choice"
    readers: dict[str, list[tuple[int, np.ndarray]]] = {}
    for gid, consumers in plan.items():
        for name, rows in consumers:
            readers.setdefault(name, []).append((gid, rows))
    for name in frontier_sites(work, [b.entry for b in blocks]):  # refit as ``run`` does
        readers.setdefault(name, [])
    levels = _levels(work, set(readers))
    first = {g: min(levels[n] for n, _ in cs) for g, cs in plan.items()}
    feeds = list(feeds)
    runner, ref_runner = Segments(feeds), Segments(feeds)
    changed = 0
    for lv in sorted(set(levels.values())):
        todo = [g for g in plan if first[g] == lv]
        refit = [n for n in readers if levels[n] == lv]
        names = list(dict.fromkeys(refit + [n for g in todo for n, _ in plan[g]]))
        stats, edits = _capture(work, model, names, feeds, runner, ref_runner, streams,
                                weights)
        for gid in todo:
            count = len(removal[gid])
            if remaining is not None and gid in remaining.groups:
                remaining.current = gid
                order, score = _curve(plan[gid], stats, edits, remaining, damping)
                count = remaining.take(gid, order, score)
                pick = np.sort(order[:count].astype(np.int64))
            else:
                pick = _choose(plan[gid], stats, edits, count, damping)
            changed += len(set(pick.tolist()) - set(chosen[gid].tolist()))
            chosen[gid] = pick
        for name in (n for n in refit if n in stats):
            cut = np.concatenate([rows[chosen[g]].ravel() for g, rows in readers[name]] +
                                 [np.zeros(0, np.int64)])
            _refit_kept(stats[name], edits[name], cut, damping)
            runner.invalidate(work, [name])
    total = sum(len(chosen[g]) for g in plan)
    moved = [f"{plan[g][0][0]} {len(removal[g])}->{len(chosen[g])}" for g in plan
             if len(removal[g]) != len(chosen[g])]
    how = "select=realloc: counts re-allocated and" if remaining is not None else \
        "select=sequential:"
    return chosen, (f"{how} {len(plan)} groups chosen level by level on the cut and refit "
                    f"prefix; {changed} of their {total} cut units differ from the one-shot choice" +
                    (f"; units cut, as allocated -> now: {', '.join(moved)}" if moved else ""))


def _mask_fixed(work, coupling, removal) -> None:
    """The cut of the groups chosen once (``prune.apply.mask_units``), so the levels after
    them see it; a group that cannot be masked (no ``in`` weight) is left as it is."""
    from .apply import mask_units

    for gid, units in removal.items():
        try:
            mask_units(work, coupling, {gid: units})
        except Exception:  # noqa: BLE001 - the choice after it is then approximate
            continue


def _capture(work, original, names, feeds, runner, ref_runner, streams, weights):
    """Gram sums (targets from ``original``) and editors of the sites ``names`` of ``work``."""
    producer = {n.output[0]: i for i, n in enumerate(work.graph.node) if n.output}
    inits = constants(work)
    sites = []
    for name in names:
        site, _ = site_for(work, producer[name], inits)
        if site is not None:  # a layer after a removed block may not be (``run`` skips it)
            sites.append(site)
    made = {o for n in original.graph.node for o in n.output}
    routes = {k: v for k, v in stream_sums(work, names).items() if v in made} \
        if streams else None
    stats = accumulate(work, sites, feeds, targets=True, reference=original, streams=routes,
                       weights={k: v for k, v in (weights or {}).items() if k in names},
                       segments=runner, ref_segments=ref_runner, rerun=True)
    return stats, {s.output: _SiteEdit(work, s) for s in sites}


def _greedy(consumers, stats, edits, limit: int, damping: float, energy):
    """Greedy OBS of a group on its consumers' full-width refits, ``limit`` units deep:
    (the single consumer's removal order, or None; the summed per-unit damages, each
    consumer's divided by ``energy(site output, its Gram sums)``)."""
    total = None
    picked: list[int] | None = [] if len(consumers) == 1 else None
    for name, rows in consumers:
        st, ed = stats[name], edits[name]
        w, b = solve(st, ed.w0, ed.b0, "lstsq", damping)
        v = np.concatenate([w, b[None, :]], axis=0)
        score = _obs_greedy(st.xtx, v, rows, damping, limit, picked=picked)
        score = score / max(energy(name, st), 1e-30)
        total = score if total is None else total + score
    return picked, total


def _choose(consumers, stats, edits, count: int, damping: float) -> np.ndarray:
    """The ``count`` units the greedy OBS removes first from each consumer's full-width
    refit (module doc, 2)."""
    picked, total = _greedy(consumers, stats, edits, count, damping, lambda _, st: st.tt)
    if picked is not None:
        return np.sort(np.asarray(picked[:count], dtype=np.int64))
    return np.sort(np.argsort(total, kind="stable")[:count].astype(np.int64))


def _refit_kept(st: GramStats, edit: _SiteEdit, cut: np.ndarray, damping: float) -> None:
    """Refit a site on its kept input rows (the refit after the cut) and write it with zero
    rows for ``cut``."""
    k = st.k
    keep = np.setdiff1d(np.arange(k + 1), cut)  # the ones row (k) stays
    sub = GramStats(st.xtx[np.ix_(keep, keep)], st.xty[keep], st.tt, st.n)
    w, b = solve(sub, edit.w0[keep[:-1]], edit.b0, "lstsq", damping)
    full = np.zeros_like(edit.w0)
    full[keep[:-1]] = w
    edit.write(full, b, moved_bias=bool(np.any(np.abs(b - edit.b0) > 0)))


def _curve(consumers, stats, edits, remaining, damping):
    """(removal order, per-unit marginal damage on the stream scale of the one-shot scores)
    of a group on its consumers' full-width refit, up to its cap (``Remaining``)."""
    cap = remaining.cap(remaining.current)
    picked, total = _greedy(consumers, stats, edits, cap, damping, lambda name, st: (
        st.n * remaining.norms.get(name, st.tt / max(st.n, 1))))
    if picked is not None:
        order = np.asarray(picked[:cap] + [u for u in np.argsort(total, kind="stable")
                                           if u not in set(picked[:cap])], dtype=np.int64)
    else:
        order = np.argsort(total, kind="stable").astype(np.int64)
    return order, total


def remaining_for(model, groups, feeds, weights, candidates, need) -> "Remaining":
    """``Remaining`` of the width ``candidates``, with the stream norms of the one-shot
    scores (one run of the original over ``feeds``)."""
    from .streams import StreamStats

    streams = StreamStats(model, groups, feeds, weights)
    streams.capture(model)
    return Remaining([c for c in candidates if c.kind != "layers"], need, streams.norms())


class Remaining:
    """``select=realloc``: what the budget still needs, re-allocated over the groups not cut
    yet each time a level is reached, with that level's damages measured on the cut and
    refit prefix (``_curve``) and the one-shot candidates for the levels after it.

    ``candidates``: the width candidates of the allocation (``budget.Candidate``, no layers);
    ``need``: the cost to remove; ``norms``: stream row energy per consumer site (the
    one-shot scores' scale)."""

    def __init__(self, candidates, need: float, norms: Mapping[str, float]):
        from .budget import allocate

        self._allocate = allocate
        self.pool = list(candidates)
        self.need = float(need)
        self.norms = dict(norms)
        self.groups = {c.key for c in self.pool}
        self.current = None

    def cap(self, gid) -> int:
        return sum(len(c.units) for c in self.pool if c.key == gid)

    def fix(self, gid: int, count: int) -> None:
        """``gid`` keeps the first ``count`` units the allocation gave it."""
        n = 0
        for c in sorted((c for c in self.pool if c.key == gid), key=lambda c: c.order):
            if n >= count:
                break
            n += len(c.units)
            self.need -= c.cost
        self.need = max(self.need, 0.0)
        self.pool = [c for c in self.pool if c.key != gid]
        self.groups.discard(gid)

    def take(self, gid: int, order: np.ndarray, score: np.ndarray) -> int:
        """How many units of ``gid`` (in ``order``) the re-allocation cuts now."""
        mine = sorted((c for c in self.pool if c.key == gid), key=lambda c: c.order)
        rest = [c for c in self.pool if c.key != gid]
        new, pos = [], 0
        for c in mine:  # the same chunk sizes and costs, the new order and damages
            units = tuple(int(u) for u in order[pos:pos + len(c.units)])
            new.append(Candidate(c.kind, c.key, units, float(score[list(units)].sum()),
                                 c.cost, c.order, c.layer))
            pos += len(c.units)
        alloc = self._allocate(new + rest, self.need)
        count = len(alloc.removal.get(gid, ()))
        taken, n = 0.0, 0
        for c in new:
            if n >= count:
                break
            n += len(c.units)
            taken += c.cost
        self.pool = rest
        self.groups.discard(gid)
        self.need = max(self.need - taken, 0.0)
        return count
