"""Attention-head pruning: remove whole heads (or whole KV groups) of attention blocks.

``prune-heads`` (``--pass prune-heads:ratio=0.5``) is a policy over the coupled groups of
``graphopt.analysis.coupling``, like the width passes:

1. An attention block is a group whose units the analysis proved to be heads
   (``Group.unit == "head"``: a QKᵀ product feeding a Softmax over the keys, or a fused
   attention op, carries them; a Reshape splitting an axis into blocks is not enough): each
   head is a unit of ``head_dim`` channels, coupled across Q, K, V, their biases, rotary
   embeddings and the rows of the output projection. With grouped-query attention (fewer
   K/V heads than Q heads) a unit is one KV head with all the Q heads that read it, so
   whole KV groups go.
2. ``importance``: ``auto`` (default) is ``obs`` with calibration data and ``magnitude``
   without (and the report says that weight-only ranking is a guess); ``obs`` scores a unit
   by the output-projection error its removal leaves after the optimal refit
   (``graphopt.prune.scores``); ``activation`` scores a unit by the L2 norm of its slice of the
   attention output (the input of the output projection) on calibration data
   (``Context.calibration_feeds``, generated from the input specs when none are given);
   ``ablation`` masks one unit at a time (zeroes its output-projection rows) and measures
   the relative change of the model outputs; ``magnitude`` uses weight norms only.
3. ``scope=layer`` removes ``floor(ratio × units)`` units per layer (a unit is a head, or a
   KV group under GQA); ``scope=global`` ranks all units of all layers together (activation
   norms and ablation deltas as measured, per head of the unit; magnitude normalized per
   layer) until ``floor(ratio × all heads)`` heads are gone; every layer keeps
   ``min_heads`` heads or more.
4. An attention block that cannot be pruned (a barrier, a fused op without a handler, an
   unknown shape) is a ``Skip`` with the analysis' reason.
5. ``reconstruct`` (``auto``: ``lstsq`` with calibration data) refits the output
   projections toward the original outputs (``graphopt.prune.reconstruct``); the report
   lists each one's relative error before and after.
6. The per-layer head counts after the pass go to ``metadata_props`` as JSON lists
   (``graphopt.heads``: query heads, ``graphopt.kv_heads``: key/value heads, one entry per
   attention block in graph order), so a later onnxruntime transformer fusion can be told
   the right ``num_heads``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx

from graphopt.prune.apply import apply_removal, mask_units
from graphopt.analysis.coupling import Coupling, Group, analyze
from graphopt.errors import ConfigError
from graphopt.prune.importance import check_selection, exclusion, included, unit_scores
from graphopt.core.contract import Context, Pass, PassResult, Skip, SkipCode
from graphopt.core.registry import register
from graphopt.prune.reconstruct import consumer_sites
from graphopt.prune.scores import data_scores

from ._refit import GUESS_NOTE, check_reconstruct, keep_original, refit_step, resolve_mode

logger = logging.getLogger(__name__)

METADATA_HEADS = "graphopt.heads"
METADATA_KV_HEADS = "graphopt.kv_heads"
IMPORTANCE = ("auto", "obs", "activation", "ablation", "magnitude")


@dataclass(frozen=True)
class HeadsConfig:
    """Options of ``prune-heads`` (see the module doc)."""

    ratio: float = 0.25
    importance: Literal["auto", "obs", "activation", "ablation", "magnitude"] = "auto"
    scope: Literal["layer", "global"] = "layer"
    min_heads: int = 1
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    reconstruct: str = "auto"
    damping: float = 0.1

    def __post_init__(self):
        check_selection(self.ratio, self.importance, IMPORTANCE, self.scope, ("layer", "global"),
                        self.include, self.exclude)
        if self.min_heads < 1:
            raise ConfigError(f"min_heads must be 1 or more, got {self.min_heads}")
        check_reconstruct(self.reconstruct, self.damping)


@dataclass
class HeadBlock:
    """One attention block as the pass sees it: its group and how heads map to units."""

    group: Group
    head_dim: int
    heads_per_unit: int  # Q heads per unit (1 for MHA, the group size for GQA)

    @property
    def heads(self) -> int:
        return self.group.size * self.heads_per_unit

    @property
    def kv_heads(self) -> int:
        return self.group.size


@dataclass
class HeadsPlan:
    coupling: Coupling
    blocks: list[HeadBlock] = field(default_factory=list)
    removal: dict[int, np.ndarray] = field(default_factory=dict)
    skipped: list[Skip] = field(default_factory=list)
    scores: dict[int, np.ndarray] = field(default_factory=dict)
    importance: str = ""

    def head_counts(self) -> tuple[list[int], list[int]]:
        heads, kv = [], []
        for b in self.blocks:
            gone = len(self.removal.get(b.group.id, ()))
            heads.append((b.group.size - gone) * b.heads_per_unit)
            kv.append(b.group.size - gone)
        return heads, kv


ATTENTION_OPS = ("Attention", "MultiHeadAttention", "GroupQueryAttention")


def is_attention_group(group: Group, fused: set[str] = frozenset()) -> bool:
    """An attention block: the analysis proved its units are heads (``group.unit ==
    "head"``: a QKᵀ product feeding a Softmax over the keys, or a fused attention op, carries
    them), or the group reaches a fused attention op (``fused``: node names) that stopped it
    (reported as a skip). A Reshape that splits an axis into blocks is not enough."""
    return group.unit == "head" or bool(fused.intersection(group.node_names))


def head_block(group: Group) -> HeadBlock:
    """Head size and query heads per unit, as the analysis proved them."""
    return HeadBlock(group, int(group.head_dim or group.unit_width),
                     max(int(group.heads_per_unit), 1))


def _site(group: Group) -> str:
    return f"attention '{group.source}' ({group.size} units)"


def _output_proj_acts(coupling: Coupling, group: Group):
    """The attention outputs the group's output projection reads: (member, unit atoms)."""
    view = coupling.view
    in_nodes = {m.slot.use[0] for m in group.members_with_role("in") if m.slot.use}
    out = []
    for m in group.members_with_role("act_in"):
        if m.slot.use is not None:
            continue
        if any(idx in in_nodes for idx, _ in view.consumers.get(m.slot.tensor, [])):
            out.append(m)
    return out


def activation_scores(coupling: Coupling, groups: list[Group], feeds) -> dict[int, np.ndarray]:
    """Per-unit L2 norm of the attention output slice (root mean square over tokens)."""
    from graphopt.data.calibration import ChannelStats, capture

    wanted: dict[int, list] = {g.id: _output_proj_acts(coupling, g) for g in groups}
    axes = {m.slot.tensor: m.axis for ms in wanted.values() for m in ms}
    stats = None
    if axes:
        if not feeds:
            raise ConfigError("activation importance needs calibration inputs")
        stats = ChannelStats(axis=axes)
        capture(coupling.model, feeds, list(axes), stats)
    out: dict[int, np.ndarray] = {}
    fallback = []
    for g in groups:
        parts = []
        for m in wanted[g.id]:
            name = m.slot.tensor
            if stats is None or name not in stats.count:
                continue
            ms = stats.sq_sum[name] / max(stats.count[name], 1)
            parts.append(np.sqrt(ms[g.index[m]].sum(1)))
        if parts:
            out[g.id] = np.mean(parts, axis=0)
        else:
            fallback.append(g)
    if fallback:
        logger.info("%d attention block(s) without a captured output: scored by magnitude",
                    len(fallback))
        out.update(unit_scores(coupling, fallback, "l2"))
    return out


def ablation_scores(model: onnx.ModelProto, coupling: Coupling, groups: list[Group],
                    feeds) -> dict[int, np.ndarray]:
    """Relative change of every model output when one unit is masked (one run per unit)."""
    from graphopt.runtime.session import outputs_of as run

    if not feeds:
        raise ConfigError("ablation importance needs calibration inputs")
    feeds = list(feeds)
    ref = [run(model, f) for f in feeds]
    out: dict[int, np.ndarray] = {}
    for g in groups:
        scores = np.zeros(g.size)
        for u in range(g.size):
            masked = onnx.ModelProto()
            masked.CopyFrom(model)
            mask_units(masked, coupling, {g.id: np.array([u])})
            total = 0.0
            for f, r in zip(feeds, ref):
                got = run(masked, f)
                for name, value in r.items():
                    a = np.asarray(value, dtype=np.float64)
                    if not np.issubdtype(a.dtype, np.floating) or not a.size:
                        continue
                    diff = np.linalg.norm(np.asarray(got[name], np.float64) - a)
                    total += diff / max(np.linalg.norm(a), 1e-12)
            scores[u] = total
        out[g.id] = scores
    return out


def select_heads(blocks: list[HeadBlock], scores: dict[int, np.ndarray], ratio: float,
                 scope: str, min_heads: int) -> dict[int, np.ndarray]:
    """Units to remove per group id: the lowest-scoring ones, every block keeping at least
    ``min_heads`` heads (rounded up to whole units)."""
    def cap(b: HeadBlock) -> int:
        keep_units = max(math.ceil(min_heads / b.heads_per_unit), 1)
        return max(b.group.size - keep_units, 0)

    wanted: dict[int, int] = {}
    if scope == "layer":
        for b in blocks:
            wanted[b.group.id] = min(math.floor(ratio * b.group.size + 1e-9), cap(b))
    else:
        # one ranking over heads of all layers: a unit of k heads counts k heads
        total = sum(b.heads for b in blocks)
        budget = math.floor(ratio * total + 1e-9)
        # activation norms and ablation deltas compare across layers as they are;
        # magnitude scores come normalized per layer (weight scales differ by layer)
        entries = sorted((float(s) / b.heads_per_unit, b.group.id, u, b.heads_per_unit)
                         for b in blocks for u, s in enumerate(scores[b.group.id]))
        caps = {b.group.id: cap(b) for b in blocks}
        taken = {b.group.id: 0 for b in blocks}
        for _, gid, _u, k in entries:
            if budget < k:
                continue
            if taken[gid] < caps[gid]:
                taken[gid] += 1
                budget -= k
        wanted = taken
    removal: dict[int, np.ndarray] = {}
    for b in blocks:
        n = wanted[b.group.id]
        if n <= 0:
            continue
        order = np.argsort(np.asarray(scores[b.group.id]), kind="stable")
        removal[b.group.id] = np.sort(order[:n])
    return removal


@register
class PruneHeads(Pass[HeadsConfig], name="prune-heads", lossless=False):
    """Remove the least important attention heads of every attention block (module doc)."""

    def plan(self, model: onnx.ModelProto, ctx: Context) -> HeadsPlan:
        cfg = self.config
        coupling = analyze(model, ctx.input_shapes)
        plan = HeadsPlan(coupling)
        chosen: list[HeadBlock] = []
        fused = {n.name or n.output[0] for n in coupling.view.nodes
                 if n.op_type in ATTENTION_OPS}
        for g in coupling.groups:
            if not is_attention_group(g, fused):
                if g.unit == "block" and not g.prunable:
                    plan.skipped.append(Skip(_site(g), f"units are blocks of {g.unit_width} "
                                             "channels, but no attention over them was "
                                             f"reached: {g.reason}"))
                continue
            if g.unit != "head":
                if not g.prunable:  # stopped at a fused op it could not see into
                    plan.skipped.append(Skip(_site(g), g.reason or "not prunable",
                                             SkipCode.NOT_PRUNABLE))
                continue
            block = head_block(g)
            plan.blocks.append(block)
            if not included(g, cfg.include):
                continue
            why, code = exclusion(g, cfg.exclude), SkipCode.EXCLUDED
            if why is None and not g.prunable:
                why, code = g.reason or "not prunable", SkipCode.NOT_PRUNABLE
                out = g.barrier.slot.tensor if g.barrier is not None else None
                if out in coupling.view.graph_outputs:
                    # a heads axis as a graph output: present keys/values or attentions
                    why = (f"the heads reach graph output '{out}' (a KV cache or attention "
                           "weights): its head count is the model's interface; export "
                           "without them (use_cache=False, output_attentions=False) to "
                           f"prune heads. {why}")
            if why is None and block.heads <= cfg.min_heads:
                why, code = f"only {block.heads} head(s)", SkipCode.TOO_SMALL
            if why is not None:
                plan.skipped.append(Skip(_site(g), why, code))
                continue
            chosen.append(block)
        if not plan.blocks and not plan.skipped:
            plan.skipped.append(Skip("model", "no attention heads found: no MatMul of two "
                                     "activations feeding a Softmax over the keys, and no "
                                     "fused attention op"))
        if not chosen or cfg.ratio == 0:
            return plan
        groups = [b.group for b in chosen]
        importance = cfg.importance
        if importance == "auto":
            importance = "obs" if ctx.calibration else "magnitude"
        plan.importance = importance
        if importance == "obs":
            scores, fallback = data_scores(model, coupling, groups, "obs",
                                           ctx.calibration_feeds(model), damping=cfg.damping)
            if fallback:
                scores.update(activation_scores(coupling, fallback,
                                                ctx.calibration_feeds(model)))
        elif importance == "magnitude":
            scores = unit_scores(coupling, groups, "l2")
        elif importance == "activation":
            scores = activation_scores(coupling, groups, ctx.calibration_feeds(model))
        else:
            scores = ablation_scores(model, coupling, groups, ctx.calibration_feeds(model))
        plan.scores = scores
        plan.removal = select_heads(chosen, scores, cfg.ratio, cfg.scope, cfg.min_heads)
        return plan

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        plan = self.plan(model, ctx)
        refit_counters, refit_skips, details = {}, [], {"importance": plan.importance}
        if plan.removal:
            mode = resolve_mode(self.config.reconstruct, ctx)
            original = keep_original(model, mode)
            outputs, columns = consumer_sites(plan.coupling, plan.removal)
            apply_removal(model, plan.coupling, plan.removal)
            refit_counters, refit_skips, refit = refit_step(
                original, model, outputs, ctx, mode, self.config.damping, columns)
            details.update(refit)
        if not ctx.calibration:
            details["notes"] = [GUESS_NOTE] + details.get("notes", [])
        if plan.blocks:
            heads, kv = plan.head_counts()
            set_metadata(model, METADATA_HEADS, json.dumps(heads))
            set_metadata(model, METADATA_KV_HEADS, json.dumps(kv))
        removed = sum(len(u) * b.heads_per_unit for b in plan.blocks
                      for u in [plan.removal.get(b.group.id, ())])
        counters = {"attention_blocks": len(plan.blocks),
                    "blocks_pruned": sum(1 for u in plan.removal.values() if len(u)),
                    "heads_removed": int(removed),
                    "blocks_skipped": len(plan.skipped), **refit_counters}
        return PassResult(model, bool(plan.removal), counters, plan.skipped + refit_skips,
                          plan, details=details)


def set_metadata(model: onnx.ModelProto, key: str, value: str) -> None:
    for p in model.metadata_props:
        if p.key == key:
            p.value = value
            return
    entry = model.metadata_props.add()
    entry.key = key
    entry.value = value


def head_counts(model: onnx.ModelProto) -> list[int] | None:
    """The per-layer query-head counts a previous ``prune-heads`` recorded, if any."""
    for p in model.metadata_props:
        if p.key == METADATA_HEADS:
            try:
                return [int(v) for v in json.loads(p.value)]
            except (ValueError, TypeError):
                return None
    return None
