"""Which units and layers ``prune`` may cut (its planning helpers)."""

from __future__ import annotations

import onnx

from graphopt.analysis.coupling import Coupling
from graphopt.analysis.structure import find_structure
from graphopt.core.contract import Skip
from graphopt.prune.budget import Candidate

from .heads import head_block, is_attention_group


def prunable_groups(coupling: Coupling, plan, kinds) -> list:
    """The coupling's prunable groups of ``kinds``, each kind (and head block) noted in
    ``plan``."""
    from .width import PruneNeurons

    out = []
    neurons = PruneNeurons()
    for g in coupling.groups:
        if not g.prunable:
            continue
        if is_attention_group(g) and g.kind == "blocks":
            if "heads" in kinds:
                plan.kinds[g.id] = "heads"
                plan.heads[g.id] = head_block(g)
                out.append(g)
        elif g.kind == "channels" and "channels" in kinds:
            plan.kinds[g.id] = "channels"
            out.append(g)
        elif g.kind == "neurons" and neurons.eligible(g) is None and "neurons" in kinds:
            plan.kinds[g.id] = "neurons"
            out.append(g)
    return out

def removable_blocks(model: onnx.ModelProto, plan) -> list:
    """(block, index) of the removable layers but the last one; the others are skipped in
    ``plan`` with their reason."""
    layers = list(find_structure(model).blocks("layer"))
    for b in layers:
        if not b.removable:
            plan.skipped.append(Skip(b.site, b.reason))
    return [(b, i) for i, b in enumerate(layers) if b.removable][: max(len(layers) - 1, 0)] \
        if len(layers) > 1 else []

def removable_cost(candidates: list[Candidate]) -> float:
    """The most the candidates can remove (a removed layer takes its units with it)."""
    layers = sorted((c for c in candidates if c.kind == "layers"), key=lambda c: -c.cost)
    gone = {c.key for c in layers}
    total = sum(c.cost for c in layers)
    total += sum(c.cost for c in candidates if c.kind != "layers" and c.layer not in gone)
    return total
