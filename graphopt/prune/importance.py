"""Importance of the units of coupled groups, and the selection of which units to remove.

Scores (``unit_scores``), one per unit, aggregated over the whole group:

1. ``l1`` / ``l2``: mean |w| / root-mean-square of every weight slice the unit owns, on its
   filters (``out`` members) and on its consumers' input weights (``in`` members);
2. ``bn_scale``: |gamma| of the BatchNorm/InstanceNorm scales in the group;
3. ``activation``: mean |a| of the activations the group's consumers read, and ``apoz``:
   1 − (average percentage of zeros), both captured through onnxruntime on calibration
   inputs (``graphopt.data.calibration``);
4. ``random``: a seeded baseline.

Each member's scores are divided by their mean before members are averaged (so a big
layer does not drown a small one), and the group's scores are divided by their mean again:
a score of 0.5 means "half as important as the average unit of its group", which is what
makes one global ranking across groups meaningful. A method that has nothing to read in a
group (no BatchNorm for ``bn_scale``, no captured activation) falls back to ``l2``.

Selection (``select_units``): a ratio per group, or one global ranking with a minimum kept
per group; widths rounded to ``round_to`` channels; a group is never emptied.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import re
from collections.abc import Mapping, Sequence

import numpy as np

from graphopt.analysis.coupling import Coupling, Group
from graphopt.errors import ConfigError

logger = logging.getLogger(__name__)

IMPORTANCE = ("l1", "l2", "bn_scale", "activation", "apoz", "random")


def _normalized(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    mean = float(v.mean()) if v.size else 0.0
    return v / mean if mean > 0 else np.ones_like(v)


def _combine(parts: list[np.ndarray]) -> np.ndarray | None:
    if not parts:
        return None
    return _normalized(np.mean([_normalized(p) for p in parts], axis=0))


def _weight_scores(coupling: Coupling, group: Group, norm: str) -> np.ndarray | None:
    parts = []
    for m in group.members_with_role("out", "in"):
        value = coupling.view.const(m.slot.tensor)
        if value is None or not np.issubdtype(value.dtype, np.floating):
            continue
        flat = np.moveaxis(value.astype(np.float64), m.axis, 0).reshape(value.shape[m.axis], -1)
        per_atom = np.abs(flat).sum(1) if norm == "l1" else (flat * flat).sum(1)
        idx = group.index[m]
        count = idx.shape[1] * max(flat.shape[1], 1)
        unit = per_atom[idx].sum(1) / count
        parts.append(unit if norm == "l1" else np.sqrt(unit))
    return _combine(parts)


def _bn_scores(coupling: Coupling, group: Group) -> np.ndarray | None:
    parts = []
    for m in group.members_with_role("bn_scale"):
        value = coupling.view.const(m.slot.tensor)
        if value is None:
            continue
        parts.append(np.abs(value.astype(np.float64))[group.index[m]].mean(1))
    return _combine(parts)


def activation_members(group: Group):
    """The activations the group's consumers read (members with role ``act_in``)."""
    return [m for m in group.members_with_role("act_in") if m.slot.use is None]


def unit_scores(
    coupling: Coupling,
    groups: Sequence[Group],
    method: str,
    *,
    feeds: Sequence[Mapping[str, np.ndarray]] | None = None,
    seed: int = 0,
) -> dict[int, np.ndarray]:
    """Normalized importance of every unit of ``groups`` (group id -> scores)."""
    if method not in IMPORTANCE:
        raise ConfigError(f"unknown importance '{method}' (known: {', '.join(IMPORTANCE)})")
    out: dict[int, np.ndarray] = {}
    stats = None
    if method in ("activation", "apoz"):
        stats = _capture(coupling, groups, feeds)
    rng = np.random.default_rng(seed)
    for g in groups:
        score = None
        if method == "random":
            score = _normalized(rng.random(g.size) + 1e-3)
        elif method in ("l1", "l2"):
            score = _weight_scores(coupling, g, method)
        elif method == "bn_scale":
            score = _bn_scores(coupling, g)
        else:
            parts = []
            for m in activation_members(g):
                name = m.slot.tensor
                if stats is None or name not in stats.count or stats.axis.get(name) != m.axis:
                    continue
                per_atom = stats.mean_abs(name) if method == "activation" else \
                    1.0 - stats.apoz(name)
                parts.append(per_atom[g.index[m]].mean(1))
            score = _combine(parts)
        if score is None:
            logger.info("group %d (%s): no %s to read, scored by l2", g.id, g.source, method)
            score = _weight_scores(coupling, g, "l2")
        if score is None:
            score = np.ones(g.size)
        out[g.id] = score
    return out


def _capture(coupling: Coupling, groups: Sequence[Group], feeds):
    from graphopt.data.calibration import ChannelStats, capture

    axes: dict[str, int] = {}
    for g in groups:
        for m in activation_members(g):
            axes.setdefault(m.slot.tensor, m.axis)
    if not axes:
        return None
    if not feeds:
        raise ConfigError("activation importance needs calibration inputs")
    stats = ChannelStats(axis=axes)
    capture(coupling.model, feeds, list(axes), stats)
    return stats


# ---------------------------------------------------------------------------- selection


def matches(name: str, patterns: Sequence[str]) -> bool:
    """``re:PATTERN`` is a regular expression (searched); anything else is a glob."""
    for p in patterns:
        if p.startswith("re:"):
            if re.search(p[3:], name):
                return True
        elif fnmatch.fnmatchcase(name, p):
            return True
    return False


def check_patterns(patterns: Sequence[str], option: str) -> None:
    for p in patterns:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as exc:
                raise ConfigError(f"{option}: bad regular expression '{p[3:]}': {exc}") from None


def check_selection(ratio: float, importance: str, known: Sequence[str], scope: str,
                    scopes: Sequence[str], include: Sequence[str], exclude: Sequence[str]
                    ) -> None:
    """The options every pruning config shares, or ``ConfigError`` naming the bad one."""
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"ratio must be in [0, 1), got {ratio}")
    if importance not in known:
        raise ConfigError(f"importance must be one of {', '.join(known)}, got '{importance}'")
    if scope not in scopes:
        raise ConfigError(f"scope must be {' or '.join(scopes)}, got '{scope}'")
    check_patterns(include, "include")
    check_patterns(exclude, "exclude")


def included(group: Group, include: Sequence[str]) -> bool:
    """The group's source nodes match ``include`` (or there is none): a group left out by
    it is not the pass's business and is not reported."""
    names = group.source_nodes or (group.source,)
    return not include or any(matches(n, include) for n in names)


def exclusion(group: Group, exclude: Sequence[str]) -> str | None:
    """Why ``exclude`` leaves the group alone (a skip with code ``excluded``), else None."""
    names = group.source_nodes or (group.source,)
    if exclude and any(matches(n, exclude) for n in names):
        return "excluded by pattern"
    return None


def _step(group: Group, round_to: int) -> int:
    """Units per rounding step, so kept width (units × unit width) is a multiple of round_to."""
    width = max(group.unit_width, 1)
    return max(round_to // math.gcd(round_to, width), 1)


def _keep_count(group: Group, target_keep: int, round_to: int, min_keep: int) -> int:
    step = _step(group, round_to)
    keep = max(target_keep, min_keep, 1)
    keep = min(int(math.ceil(keep / step)) * step, group.size)
    return keep


def select_units(
    groups: Sequence[Group],
    scores: Mapping[int, np.ndarray],
    ratio: float,
    *,
    scope: str = "group",
    round_to: int = 1,
    min_keep: int = 1,
    max_ratio: float = 0.9,
) -> dict[int, np.ndarray]:
    """Units to remove per group id: the least important, by the rules in the module doc.

    1. ``scope="group"``: each group loses ``floor(ratio × size)`` units;
    2. ``scope="global"``: all units are ranked together and the lowest ``ratio`` of them
       go, but no group loses more than ``max_ratio`` of its units;
    3. then each group's kept count is rounded *up* to a multiple of ``round_to`` channels
       and kept at ``min_keep`` or more: a group is never emptied.
    """
    if scope not in ("group", "global"):
        raise ConfigError(f"scope must be 'group' or 'global', not {scope!r}")
    wanted: dict[int, int] = {}
    if scope == "group":
        for g in groups:
            wanted[g.id] = int(math.floor(ratio * g.size + 1e-9))
    else:
        total = sum(g.size for g in groups)
        budget = int(math.floor(ratio * total + 1e-9))
        cap = {g.id: min(int(math.floor(max_ratio * g.size + 1e-9)), g.size - max(min_keep, 1))
               for g in groups}
        entries = [(float(s), g.id, u) for g in groups for u, s in enumerate(scores[g.id])]
        entries.sort()
        taken = {g.id: 0 for g in groups}
        for _, gid, _u in entries:
            if budget <= 0:
                break
            if taken[gid] < cap[gid]:
                taken[gid] += 1
                budget -= 1
        wanted = taken
    removal: dict[int, np.ndarray] = {}
    for g in groups:
        keep = _keep_count(g, g.size - wanted[g.id], round_to, min_keep)
        n_remove = g.size - keep
        if n_remove <= 0:
            continue
        order = np.argsort(np.asarray(scores[g.id]), kind="stable")
        removal[g.id] = np.sort(order[:n_remove])
    return removal


def zero_units(coupling: Coupling, group: Group) -> np.ndarray:
    """Units whose contribution is exactly zero: every consumer weight slice is 0, or the
    unit feeds no consumer at all (sliced away / unused)."""
    view = coupling.view
    consumers = group.members_with_role("in")
    if any(group.roles.get(m) == "contract" for m in group.index):
        return np.zeros(0, dtype=np.int64)
    if not consumers:
        return np.arange(group.size)
    zero = np.ones(group.size, dtype=bool)
    for m in consumers:
        value = view.const(m.slot.tensor)
        if value is None:
            return np.zeros(0, dtype=np.int64)
        flat = np.moveaxis(value, m.axis, 0).reshape(value.shape[m.axis], -1)
        atom_zero = ~np.any(flat != 0, axis=1)
        zero &= atom_zero[group.index[m]].all(1)
    return np.flatnonzero(zero)

