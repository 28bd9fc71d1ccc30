"""Units of coupled groups whose *producer* side is exactly zero, for lossless removal.

``graphopt.prune.importance.zero_units`` finds units whose consumer weights are all zero. After
sparsification the other side matters as much: an output column of a MatMul weight (a conv
filter) that is entirely zero, with a zero bias, makes that channel zero whatever the input,
and every consumer then reads zeros there, so removing the unit (the producer's column, the
consumers' rows, everything coupled) leaves the outputs unchanged.

``zero_producer_units(coupling, group, feeds)``:

1. structural condition: every ``out`` member slice (the group's producer weights) and every
   ``bias`` member slice of the unit is exactly zero, and the group has no ``contract``
   member (attention scores mix units);
2. the channel must reach the consumers as exact zeros: ops between producer and consumer
   may turn 0 into a constant (a Sigmoid, an Add of a non-zero constant). Given (1) the
   channel is a function of zeros and constants only, so its value is the same for every
   input: it is read at every consumer input (``act_in`` members) on the given feeds through
   onnxruntime, and a unit counts only where all of them are exactly 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..analysis.coupling import Coupling, Group


def _slices_zero(coupling: Coupling, group: Group, roles: tuple[str, ...]) -> np.ndarray | None:
    zero = np.ones(group.size, dtype=bool)
    members = group.members_with_role(*roles)
    for m in members:
        value = coupling.view.const(m.slot.tensor)
        if value is None:
            return None
        flat = np.moveaxis(np.asarray(value), m.axis, 0).reshape(value.shape[m.axis], -1)
        atom_zero = ~np.any(flat != 0, axis=1)
        zero &= atom_zero[group.index[m]].all(1)
    return zero


def producer_zero_candidates(coupling: Coupling, group: Group) -> np.ndarray:
    """Units meeting the structural condition (1) of the module doc."""
    none = np.zeros(0, dtype=np.int64)
    if any(group.roles.get(m) == "contract" for m in group.index):
        return none
    if not group.members_with_role("out"):
        return none
    zero = _slices_zero(coupling, group, ("out",))
    bias = _slices_zero(coupling, group, ("bias",))
    if zero is None or bias is None:
        return none
    return np.flatnonzero(zero & bias)


def zero_producer_units(coupling: Coupling, groups: Sequence[Group],
                        feeds: Sequence[Mapping[str, np.ndarray]]) -> dict[int, np.ndarray]:
    """Units (per group id) whose channel is exactly zero at every consumer input."""
    from graphopt.data.calibration import capture
    from graphopt.prune.importance import activation_members

    candidates = {g.id: producer_zero_candidates(coupling, g) for g in groups}
    candidates = {gid: u for gid, u in candidates.items() if len(u)}
    if not candidates:
        return {}
    reads: dict[str, list[tuple[int, object]]] = {}
    for g in groups:
        if g.id in candidates:
            for m in activation_members(g):
                reads.setdefault(m.slot.tensor, []).append((g.id, m))
    by_id = {g.id: g for g in groups}
    alive = {gid: np.ones(len(u), dtype=bool) for gid, u in candidates.items()}

    def reducer(name: str, value: np.ndarray) -> None:
        value = np.asarray(value)
        for gid, m in reads.get(name, []):
            flat = np.moveaxis(value, m.axis, 0).reshape(value.shape[m.axis], -1)
            atom_zero = ~np.any(flat != 0, axis=1)
            atoms = by_id[gid].index[m][candidates[gid]]
            alive[gid] &= atom_zero[atoms].all(1)

    if reads:
        capture(coupling.model, feeds, list(reads), reducer)
    return {gid: candidates[gid][alive[gid]] for gid in candidates if alive[gid].any()}
