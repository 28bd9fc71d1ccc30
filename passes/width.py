"""Width pruning: conv channels and filters, MatMul/Gemm neurons, and exactly-zero units.

All three passes are thin policies over the coupled groups of
``graphopt.analysis.coupling`` and remove units with the one apply engine
(``graphopt.prune.apply``):

1. ``prune-channels`` removes the least important units of groups whose source is a
   convolution (its filters, and the matching input channels of every consumer);
2. ``prune-neurons`` does the same for groups whose source is a Gemm/MatMul with a constant
   weight and whose unit is one channel (an MLP's or FFN's hidden units); groups whose units
   are blocks of channels (attention heads) are left to ``prune-heads``;
3. ``remove-zero-channels`` (lossless) removes units whose contribution is exactly zero:
   every consumer weight slice is 0, or the unit feeds no consumer.

A group that cannot be pruned (a barrier, a graph output, an op without a handler) is a skip
with the analysis' reason; nothing is half-applied: all units are chosen, then removed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
import onnx

from graphopt.prune.apply import apply_removal
from graphopt.analysis.coupling import Coupling, Group, analyze
from graphopt.errors import ConfigError
from graphopt.prune.importance import (
    IMPORTANCE,
    check_selection,
    exclusion,
    included,
    select_units,
    unit_scores,
    zero_units,
)
from graphopt.core.contract import Context, Pass, PassResult, Skip, SkipCode
from graphopt.core.registry import register
from graphopt.prune.reconstruct import consumer_sites
from graphopt.prune.scores import DATA_METHODS, data_scores

from ._refit import (
    GUESS_NOTE,
    check_reconstruct,
    keep_original,
    refit_step,
    resolve_mode,
)


WIDTH_IMPORTANCE = ("auto",) + DATA_METHODS + IMPORTANCE


@dataclass(frozen=True)
class WidthConfig:
    """Options of ``prune-channels`` and ``prune-neurons``.

    ``ratio``: share of each group's units removed (scope=group) or of all units (global).
    ``importance``: ``auto`` (``obs`` with calibration data, else ``l1``), ``obs`` (damage
    after the optimal refit, ``graphopt.prune.scores``), ``std`` (‖W slice‖·std(x)), l1,
    l2, bn_scale, activation, apoz or random.
    ``reconstruct``: auto (lstsq with calibration data, else none), none, bias or lstsq
    (``graphopt.prune.reconstruct``); ``damping``: its λ (and the OBS score's).
    ``scope``: group (a ratio per group) or global (one ranking over all groups).
    ``round_to``: kept widths are multiples of this many channels (rounded up).
    ``include``/``exclude``: node-name patterns (glob, or ``re:REGEX``) matched against a
    group's source nodes. ``min_keep``: units every group keeps at least. ``max_ratio``: in
    global scope, the largest share of one group that may go.
    """

    ratio: float = 0.25
    importance: str = "auto"
    scope: Literal["group", "global"] = "group"
    round_to: int = 1
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    min_keep: int = 1
    max_ratio: float = 0.9
    reconstruct: str = "auto"
    damping: float = 0.1

    def __post_init__(self):
        check_selection(self.ratio, self.importance, WIDTH_IMPORTANCE, self.scope,
                        ("group", "global"), self.include, self.exclude)
        check_reconstruct(self.reconstruct, self.damping)
        if self.round_to < 1:
            raise ConfigError(f"round_to must be 1 or more, got {self.round_to}")
        if self.min_keep < 1:
            raise ConfigError(f"min_keep must be 1 or more, got {self.min_keep}")
        if not 0.0 < self.max_ratio < 1.0:
            raise ConfigError(f"max_ratio must be in (0, 1), got {self.max_ratio}")


@dataclass
class WidthPlan:
    """What a width pass decided: units to remove per group id, and the groups it skipped."""

    coupling: Coupling
    removal: dict[int, np.ndarray] = field(default_factory=dict)
    skipped: list[Skip] = field(default_factory=list)
    importance: str = ""

    def counters(self, unit_name: str) -> dict[str, int]:
        units = sum(len(u) for u in self.removal.values())
        channels = sum(len(u) * self.coupling.group(g).unit_width
                       for g, u in self.removal.items())
        return {"groups_pruned": sum(1 for u in self.removal.values() if len(u)),
                "units_pruned": int(units), f"{unit_name}_removed": int(channels),
                "groups_skipped": len(self.skipped)}


def _site(group: Group) -> str:
    return f"group {group.id} ({group.source_op} '{group.source}', {group.size} units)"


class _WidthPass(Pass[WidthConfig], lossless=False):
    kind: ClassVar[str] = ""
    unit_name: ClassVar[str] = "units"

    def concerns(self, group: Group) -> bool:
        """The group is this pass's kind of unit: the others are not reported."""
        return group.kind == self.kind

    def eligible(self, group: Group) -> str | None:
        """None if this pass may prune a group it ``concerns``, else the reason it is
        skipped (code ``not-prunable``)."""
        if not group.prunable:
            return group.reason or "not prunable"
        return None

    def plan(self, model: onnx.ModelProto, ctx: Context) -> WidthPlan:
        cfg = self.config
        coupling = analyze(model, ctx.input_shapes)
        plan = WidthPlan(coupling)
        plan.skipped.extend(Skip(site, why) for site, why in coupling.opaque)
        chosen = []
        for g in coupling.groups:
            if not self.concerns(g):
                continue
            why, code = self.eligible(g), SkipCode.NOT_PRUNABLE
            if why is None:
                if not included(g, cfg.include):
                    continue
                why, code = exclusion(g, cfg.exclude), SkipCode.EXCLUDED
            if why is None and g.size <= cfg.min_keep:
                why, code = f"only {g.size} unit(s)", SkipCode.TOO_SMALL
            if why is not None:
                plan.skipped.append(Skip(_site(g), why, code))
                continue
            chosen.append(g)
        if not chosen or cfg.ratio == 0:
            return plan
        scores = score_units(model, coupling, chosen, cfg.importance, ctx, cfg.damping, plan)
        plan.removal = select_units(chosen, scores, cfg.ratio, scope=cfg.scope,
                                    round_to=cfg.round_to, min_keep=cfg.min_keep,
                                    max_ratio=cfg.max_ratio)
        return plan

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        plan = self.plan(model, ctx)
        counters = plan.counters(self.unit_name)
        skipped, details = list(plan.skipped), {"importance": plan.importance}
        if plan.removal:
            mode = resolve_mode(self.config.reconstruct, ctx)
            original = keep_original(model, mode)
            outputs, columns = consumer_sites(plan.coupling, plan.removal)
            apply_removal(model, plan.coupling, plan.removal)
            more, refit_skips, refit = refit_step(original, model, outputs, ctx, mode,
                                                  self.config.damping, columns)
            counters.update(more)
            skipped += refit_skips
            details.update(refit)
        if not ctx.calibration:
            details["notes"] = [GUESS_NOTE] + details.get("notes", [])
        return PassResult(model, bool(plan.removal), counters, skipped, plan, details=details)


def score_units(model: onnx.ModelProto, coupling: Coupling, groups: list[Group],
                importance: str, ctx: Context, damping: float, plan=None
                ) -> dict[int, np.ndarray]:
    """Scores of ``groups``' units by ``importance`` (``auto``: ``obs`` with calibration
    data, else ``l1``); groups a data method cannot read are scored by ``activation``."""
    if importance == "auto":
        importance = "obs" if ctx.calibration else "l1"
    if plan is not None:
        plan.importance = importance
    if importance in DATA_METHODS:
        feeds = ctx.calibration_feeds(model)
        scores, fallback = data_scores(model, coupling, groups, importance, feeds,
                                       damping=damping)
        if fallback:
            scores.update(unit_scores(coupling, fallback, "activation", feeds=feeds))
        return scores
    feeds = ctx.calibration_feeds(model) if importance in ("activation", "apoz") else None
    return unit_scores(coupling, groups, importance, feeds=feeds, seed=ctx.seed)


@register
class PruneChannels(_WidthPass, name="prune-channels"):
    """Remove the least important conv channels/filters of every prunable conv group.

    1. A group is a conv's filters with everything coupled to them (BatchNorm, activations,
       residual adds, concats, the consumers' input channels); its units go together.
    2. A group reaching a graph output, a barrier or an unknown op is skipped with the reason.
    """

    kind = "channels"
    unit_name = "channels"


@register
class PruneNeurons(_WidthPass, name="prune-neurons"):
    """Remove the least important hidden units of Gemm/MatMul layers (MLP/FFN widths).

    1. A group is a weight's output columns with the next layer's input rows and everything
       between (bias, activation, elementwise ops).
    2. Groups whose unit is a block of channels (attention heads) are skipped: prune-heads
       owns them.
    """

    kind = "neurons"
    unit_name = "neurons"

    def concerns(self, group: Group) -> bool:
        return self._not_neurons(group) is not None or super().concerns(group)

    def eligible(self, group: Group) -> str | None:
        return self._not_neurons(group) or super().eligible(group)

    @staticmethod
    def _not_neurons(group: Group) -> str | None:
        """Groups that look like MLP widths but whose units are blocks: reported, not cut."""
        if group.unit == "head":
            return (f"units are attention heads ({group.unit_width} channels each); "
                    "prune-heads handles them")
        if group.kind == "blocks" and group.source_op in ("Gemm", "MatMul"):
            return (f"units are blocks of {group.unit_width} channels (a Reshape splits the "
                    "axis) that are not proven attention heads (no QKᵀ→Softmax over them), "
                    "so neither prune-neurons nor prune-heads removes them")
        return None


@register
class RemoveZeroChannels(Pass, name="remove-zero-channels", lossless=True):
    """Remove units whose contribution is exactly zero (lossless).

    1. Every consumer-side weight slice of the unit is exactly 0 (e.g. after magnitude
       pruning), or the unit feeds no consumer at all.
    2. Or its producer side is zero: every producer weight slice (a MatMul column, a conv
       filter) and bias is 0 and the channel reaches every consumer as exact zeros
       (``graphopt.sparsity.zeros``), e.g. after unstructured sparsity.
    3. A group keeps at least one unit; unprunable groups are left alone.
    """

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        from graphopt.sparsity.zeros import zero_producer_units

        coupling = analyze(model, ctx.input_shapes)
        removal: dict[int, np.ndarray] = {}
        prunable = [g for g in coupling.groups if g.prunable]
        producer_zero = zero_producer_units(coupling, prunable, ctx.sample_feeds(model, 2))
        by_producer = 0
        for g in prunable:
            zero = zero_units(coupling, g)
            extra = np.setdiff1d(producer_zero.get(g.id, zero[:0]), zero)
            by_producer += len(extra)
            zero = np.union1d(zero, extra).astype(np.int64)
            owns_an_axis = any(idx.size == coupling.dims[m] for m, idx in g.index.items())
            if len(zero) >= g.size and owns_an_axis:
                zero = zero[: g.size - 1]  # an axis must keep one index
            if len(zero):
                removal[g.id] = zero
        if removal:
            apply_removal(model, coupling, removal)
        units = sum(len(u) for u in removal.values())
        return PassResult(model, bool(removal),
                          {"groups_pruned": len(removal), "units_pruned": int(units),
                           "units_zero_producer": int(by_producer)})
