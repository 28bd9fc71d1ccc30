"""``prune``: one ranking of every prunable unit of every kind, cut to a budget, then refit.

``--pass prune:macs=0.6`` keeps 60 % of the MACs (``params=``, or ``latency=``: the share of
the run time, measured per node on ``provider`` with ``threads`` at a few uniformly reduced
widths, ``graphopt.prune.latency``; the cut is then timed against the model ``checks`` (3)
times at most and re-allocated when it misses by more than 3 %), removing attention heads,
FFN/MLP neurons, conv channels and whole layers, non-uniformly:

1. Units are those of ``prune-heads`` (attention blocks), ``prune-neurons`` and
   ``prune-channels`` (coupled groups) and ``prune-layers`` (residual blocks); ``kinds``
   limits them.
2. Damage, with calibration data: a unit's OBS damage after the optimal refit of its
   consumers (``graphopt.prune.scores``, greedy within each consumer), divided by the mean
   energy of the residual stream the consumer's output is added to (its own output when it
   joins none): a relative error of the stream per token. A layer's damage is
   E‖exit − entry‖² / E‖exit‖², the same quantity for bypassing it. Without calibration,
   units are ranked by weight magnitude (normalized per group), layers are not removed, and
   the report says that this is a guess and that fidelity was not measured. Under a
   ``latency=`` budget that guess is weighed by each unit's MACs, so among units the
   weights cannot tell apart the cut takes those holding the least compute per measured
   microsecond (the widths the kernels run worst) and keeps what runs efficiently.
3. Cost: what a unit or a layer saves of the budget's metric (``graphopt.prune.budget``).
   Candidates are taken by damage per cost until the budget is met (to within one
   candidate's cost); every group keeps ``min_keep`` units and loses at most ``max_ratio``
   of them (unset: half, or 0.9 when half cannot meet the budget: past half a group the
   damage outgrows OBS's estimate); widths are multiples of ``round_to``; a layer stays.
   ``round_to=0`` (the default): 1, except conv channels under a ``latency=`` budget on the
   CPU, which round to the CPU's NCHWc block (16 with AVX-512, 8 with AVX2: ``nchwc_block``):
   onnxruntime runs a conv whose channels are off the block outside its NCHWc kernels
   (ResNet-50 at 50 %, 8 channels off: 16 % fewer MACs, no faster); under other budgets the
   report notes the groups cut off the block (``latency.off_block_note``).
4. Then the cut is applied (units, then layers) and reconstructed (``reconstruct``, as in
   the other structural passes): the consumers of cut units and the first layers after a
   removed block are refit toward the original model, sequentially (figures for every
   option: benchmarks/RECONSTRUCT.md). ``refit=all`` refits every weight layer downstream
   of a change too (layer-wise mask tuning; no better on MiniLM at 5× the time).
   ``target=stream`` (default; ``output``: each layer's own output) fits a layer adding
   into the residual stream (attention output, FFN down projection) so the *stream*
   matches the original's, absorbing the error of the layers before it.
   ``cv=K``: each site's damping by K-fold cross-validation (``reconstruct.choose_damping``).
   ``search=N``: N rounds of measured sensitivity (``graphopt.prune.sensitivity``): each
   group (and layer) is probed at what the allocation takes from it, the model run with
   the OBS-compensated cut, and its damages scaled by measured output damage over
   predicted before allocating again (Kwon et al.'s mask search by measurement); past
   the units a group was probed at its damage is scaled by at least 1, and a later round
   probes only the groups cut past their probe (``graphopt.prune.search``). Each probe
   runs only the graph after its edit, with the scores' inverses; ``probe_feeds=N``
   (default: the given feeds holding 64 samples; 0: all) measures the probes on N of the
   given feeds; a classifier is read before its Softmax. ``search=auto`` (default): one
   round when the probes' estimated CPU time (their MACs, elements written and model
   copies, counted) is at most 30 s, else none (``graphopt.prune.search_work``; the report
   says which; RECONSTRUCT.md: the PP-OCR classifier and MiniLM on, BERT-base off); with
   ``final=all`` the run on all data reuses the held-out run's factors (one round in all,
   ``graphopt.prune.shared``). Without calibration data no round runs.
   ``folds=N`` (default 1): the probes are cross-fitted over N folds of the calibration
   (a feed and its swapped-token copy in one fold): each fold is measured with the
   compensation solved on the others, so a group whose refit only fits the calibration's
   noise (MiniLM's FFN down projections: 8-12× the in-sample damage on held-out rows) is
   charged for it. MiniLM macs=0.6 (``max_ratio=0.5,postnorm=true,search=1,
   target=stream``, 105 sentences): cosine 0.932 -> 0.934 on held-out shipped sentences,
   0.808 -> 0.821 on other prose, at the same number of probes.
   ``select=sequential`` (default ``once``): each group's units (as many as the allocation
   gave it) are chosen level by level by OBS on the inputs of the already cut and refit
   prefix, against the original's target (``graphopt.prune.sequential``; SlimGPT).
   ``select=realloc``: the same, and at each level what the budget still needs is
   re-allocated over the levels not cut yet, this level priced on the real prefix.
   ``postnorm=true``: a residual sum read by a LayerNormalization weighs its Gram rows by
   1 / its variance per token: the error the norm passes on (``graphopt.prune.postnorm``).
   ``swap_tokens=F`` (default 0.2; 0 turns it off): a model with token-id inputs is
   scored and refit on the calibration plus a copy with a share F of the tokens swapped
   for random vocabulary ids (``graphopt.data.vary``; twice the calibration rows;
   ``swap_copies=N`` copies, each with other swaps). ``spans=join|crop`` (off) adds copies
   of joined sentence pairs and of cropped spans (``graphopt.data.spans``), each with its
   swapped twins (3× today's rows; RECONSTRUCT.md: better on every set measured).
   The budget is counted as the cut really removes it (two cut groups meeting in one conv
   overlap; ``budget.exact_removed``) and met to within one width chunk's cost: a layer
   that would pass it by more waits (``budget.allocate``).
5. Refused before any pass runs, in one line: no budget or two, a fraction outside (0, 1],
   a budget below what ``min_keep``/``max_ratio`` allow, ``latency=`` on a provider that
   does not start on this machine.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import onnx

from graphopt.analysis.coupling import Coupling, analyze
from graphopt.core.contract import Context, Pass, PassResult, Skip
from graphopt.core.registry import register
from graphopt.data.calibration import capture
from graphopt.data.gram import site_for, token_mask
from graphopt.errors import ConfigError
from graphopt.prune.apply import apply_removal
from graphopt.prune.blocks import remove_blocks
from graphopt.prune.budget import (
    Candidate,
    allocate,
    block_cost,
    block_items,
    chunks,
    exact_removed,
    item_costs,
    node_macs,
    unit_costs,
    unit_shares,
)
from graphopt.prune.importance import _step, unit_scores
from graphopt.prune.latency import (checked_cut, latency_note, nchwc_block, off_block_note,
                                    time_cut)
from graphopt.prune.latency import measure as measure_latency
from graphopt.prune.reconstruct import consumer_sites, frontier_sites
from graphopt.prune.search import scaled
from graphopt.prune.search_work import plan_rounds
from graphopt.prune.shared import calibration_copies, held_out_search, keep_search
from graphopt.prune.shared import scores as shared_scores
from graphopt.prune.streams import consumer_outputs

from ._prune_units import prunable_groups, removable_blocks, removable_cost
from ._refit import GUESS_NOTE, check_reconstruct, keep_original, refit_step, resolve_mode
from .heads import METADATA_HEADS, METADATA_KV_HEADS, set_metadata

KINDS = ("heads", "neurons", "channels", "layers")
REFITS = ("cut", "all")
AUTO_RATIOS = (0.5, 0.9)  # max_ratio unset: half a group, more only when the budget needs it
TARGETS = ("output", "stream")
SELECTS = ("once", "sequential", "realloc")


@dataclass(frozen=True)
class PruneConfig:
    """Options of ``prune`` (module doc): one of ``macs``, ``params``, ``latency`` (the
    fraction kept), the ``kinds`` of units, ``min_keep`` units per group, ``max_ratio`` of a
    group at most, ``round_to`` channels, ``reconstruct``/``damping`` as in the other
    structural passes, ``refit`` (``cut``: the layers reading cut units; ``all``: every
    weight layer downstream), ``target`` (``output`` or ``stream``), ``search`` rounds of
    measured sensitivity (``auto``: module doc, 4), ``postnorm`` row weights,
    ``swap_tokens`` (share of tokens swapped in an extra calibration copy), ``cv`` folds
    choosing the damping per site, and the ``provider`` and intra-op ``threads`` (0:
    onnxruntime's default) a latency budget is measured with, and how many ``checks`` (A/B
    timings of the cut, each followed by a corrected allocation) it gets."""

    macs: float | None = None
    params: float | None = None
    latency: float | None = None
    kinds: tuple[str, ...] = KINDS
    min_keep: int = 1
    max_ratio: float | None = None  # None: AUTO_RATIOS, the first that meets the budget
    round_to: int = 0
    reconstruct: str = "auto"
    damping: float = 0.1
    provider: str = "cpu"
    score: str = "obs"
    refit: str = "cut"
    target: str = "stream"
    search: int | str = "auto"  # rounds, or "auto" (graphopt.prune.search_work)
    folds: int = 1  # cross-fitted search probes (module doc)
    probe_feeds: int | None = None  # search probes on N feeds (0: all; None: 64 samples)
    postnorm: bool = False
    swap_tokens: float = 0.2
    swap_copies: int = 1  # how many swapped copies (RECONSTRUCT.md: 2 helps other text)
    spans: str = "none"  # joined / cropped copies of token feeds (graphopt.data.spans)
    threads: int = 0
    checks: int = 3
    cv: int = 0
    select: str = "once"  # which units of a group: graphopt.prune.sequential

    def __post_init__(self):
        given = [(k, v) for k, v in (("macs", self.macs), ("params", self.params),
                                     ("latency", self.latency)) if v is not None]
        if len(given) != 1:
            raise ConfigError("give one budget: macs=F, params=F or latency=F (the fraction "
                              f"to keep), not {len(given)}")
        name, value = given[0]
        if not 0.0 < value <= 1.0:
            raise ConfigError(f"{name}={value} is not a fraction to keep in (0, 1]")
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise ConfigError(f"kinds must be some of {', '.join(KINDS)}, got {bad or 'none'}")
        if self.min_keep < 1:
            raise ConfigError(f"min_keep must be 1 or more, got {self.min_keep}")
        if self.max_ratio is not None and not 0.0 < self.max_ratio < 1.0:
            raise ConfigError(f"max_ratio must be in (0, 1), got {self.max_ratio}")
        if self.round_to < 0:
            raise ConfigError(f"round_to must be 1 or more (0: automatic), got "
                              f"{self.round_to}")
        check_reconstruct(self.reconstruct, self.damping)
        if not 0.0 <= self.swap_tokens < 1.0:
            raise ConfigError(f"swap_tokens must be a share in [0, 1), got {self.swap_tokens}")
        if self.swap_copies < 1:
            raise ConfigError(f"swap_copies must be 1 or more, got {self.swap_copies}")
        if any(k not in ("none", "join", "crop") for k in self.spans.split("|")):
            raise ConfigError(f"spans must be none, join, crop or join|crop, got "
                              f"{self.spans}")
        if self.probe_feeds is not None and self.probe_feeds < 0:
            raise ConfigError(f"probe_feeds must be 0 (all) or more, got {self.probe_feeds}")
        if self.folds < 1:
            raise ConfigError(f"folds must be 1 or more, got {self.folds}")
        if self.cv < 0 or self.cv == 1:
            raise ConfigError(f"cv must be 0 (off) or 2 or more folds, got {self.cv}")
        if self.search != "auto" and (not isinstance(self.search, int) or self.search < 0):
            raise ConfigError(f"search must be auto or 0 or more rounds, got {self.search}")
        if self.target not in TARGETS:
            raise ConfigError(f"target must be one of {', '.join(TARGETS)}, got "
                              f"'{self.target}'")
        if self.select not in SELECTS:
            raise ConfigError(f"select must be one of {', '.join(SELECTS)}, got "
                              f"'{self.select}'")
        if self.checks < 0:
            raise ConfigError(f"checks must be 0 or more, got {self.checks}")
        if self.threads < 0:
            raise ConfigError(f"threads must be 0 (onnxruntime's default) or more, got "
                              f"{self.threads}")
        if self.refit not in REFITS:
            raise ConfigError(f"refit must be one of {', '.join(REFITS)}, got '{self.refit}'")
        if self.latency is not None:
            from graphopt.runtime.providers import working_providers

            if self.provider not in working_providers():
                raise ConfigError(f"latency={self.latency} is measured on provider "
                                  f"'{self.provider}', which does not start on this machine "
                                  f"(working: {', '.join(working_providers())})")

    @property
    def metric(self) -> tuple[str, float]:
        for k in ("macs", "params", "latency"):
            if getattr(self, k) is not None:
                return k, float(getattr(self, k))
        raise AssertionError


@dataclass
class PrunePlan:
    coupling: Coupling
    removal: dict[int, np.ndarray] = field(default_factory=dict)
    blocks: list = field(default_factory=list)  # structure blocks (layers) to remove
    kinds: dict[int, str] = field(default_factory=dict)
    heads: dict[int, object] = field(default_factory=dict)  # group id -> HeadBlock
    total: float = 0.0
    removed: float = 0.0
    skipped: list[Skip] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    key: tuple = ()
    feeds: list | None = None  # calibration as scored (with swapped-token copies)
    latency: object = None  # graphopt.prune.latency.LatencyTable of a latency= budget
    checks: list = field(default_factory=list)  # latency= cuts timed: predicted/measured
    folds: list | None = None  # fold id per refit feed (``cv``)
    max_ratio: float = 0.9  # as used
    inverses: dict | None = None  # the scores' damped inverse per site (``search``'s probes)
    rounds: int = 0  # search rounds to run (``search_work.decide``)
    probes: list | None = None  # the feeds the probes run on (``search.probe_subset``)
    search: dict = field(default_factory=dict)  # the report's details["search"]


def _model_key(model: onnx.ModelProto) -> tuple:
    """Identifies the model ``check`` planned on, so ``run`` reuses the plan only for it."""
    return (id(model), tuple(n.op_type for n in model.graph.node),
            tuple((i.name, tuple(i.dims)) for i in model.graph.initializer))


@register
class Prune(Pass[PruneConfig], name="prune", lossless=False):
    """Remove the cheapest-damage units of every kind until a MACs/params/latency budget is
    met, then refit (module doc)."""

    def check(self, model: onnx.ModelProto, ctx: Context) -> None:
        self._plan = self.plan(model, ctx)

    def data_feeds(self, model: onnx.ModelProto, feeds) -> list:
        """The calibration this pass scores and refits on: ``feeds`` and its copies
        (``graphopt.final_run``'s estimate)."""
        return calibration_copies(list(feeds), model, self.config, True)[0]

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        cached = getattr(self, "_plan", None)
        plan = cached if cached is not None and cached.key == _model_key(model) else \
            self.plan(model, ctx)
        self._plan = None
        cfg = self.config
        mode = resolve_mode(cfg.reconstruct, ctx)
        original = keep_original(model, mode) if (plan.removal or plan.blocks) else None
        outputs, columns = consumer_sites(plan.coupling, plan.removal,
                                          after=[b.exit for b in plan.blocks],
                                          downstream=cfg.refit == "all")
        if plan.removal:
            apply_removal(model, plan.coupling, plan.removal)
        if plan.heads:
            heads, kv = [], []
            dead = {n for b in plan.blocks for n in b.nodes}
            for gid, hb in plan.heads.items():
                if hb.group.position in dead:
                    continue
                gone = len(plan.removal.get(gid, ()))
                heads.append((hb.group.size - gone) * hb.heads_per_unit)
                kv.append(hb.group.size - gone)
            set_metadata(model, METADATA_HEADS, json.dumps(heads))
            set_metadata(model, METADATA_KV_HEADS, json.dumps(kv))
        if plan.blocks:
            remove_blocks(model, plan.blocks)
            outputs = outputs + frontier_sites(model, [b.entry for b in plan.blocks])
        counters = {f"{k}_removed": 0 for k in ("heads", "neurons", "channels")}
        for gid, units in plan.removal.items():
            kind = plan.kinds[gid]
            per = plan.heads[gid].heads_per_unit if kind == "heads" else 1
            counters[f"{kind}_removed"] += len(units) * per
        counters["layers_removed"] = len(plan.blocks)
        metric, fraction = cfg.metric
        details = {"budget": {"metric": metric, "keep": fraction, "total": plan.total,
                              "removed": plan.removed,
                              "kept_fraction": 1 - plan.removed / plan.total if plan.total
                              else 1.0}, "notes": list(plan.notes), "search": plan.search}
        if plan.latency is not None:
            details["latency_table"] = plan.latency.report()
            details["latency_checks"] = plan.checks
        skipped = list(plan.skipped)
        if original is not None:
            # sites inside a removed block are gone with it, not sites the refit skipped
            produced = {n.output[0] for n in model.graph.node if n.output}
            outputs = [o for o in dict.fromkeys(outputs) if o in produced]
            more, refit_skips, refit = refit_step(original, model, outputs, ctx, mode,
                                                  cfg.damping, columns,
                                                  streams=cfg.target == "stream",
                                                  postnorm=cfg.postnorm, feeds=plan.feeds,
                                                  folds=plan.folds)
            counters.update(more)
            details.update({k: v for k, v in refit.items() if k != "notes"})
            details["notes"] += refit.get("notes", [])
            skipped += refit_skips
        changed = bool(plan.removal or plan.blocks)
        return PassResult(model, changed, counters, skipped, plan, details=details)

    # ------------------------------------------------------------------------- planning

    def plan(self, model: onnx.ModelProto, ctx: Context) -> PrunePlan:
        cfg = self.config
        metric, fraction = cfg.metric
        coupling = analyze(model, ctx.input_shapes)
        plan = PrunePlan(coupling, key=_model_key(model))
        data = bool(ctx.calibration)
        feeds = ctx.calibration_feeds(model)
        given = len(feeds)  # the copies follow in blocks of ``given`` (shared.calibration_copies)
        if not data:
            plan.notes.append(GUESS_NOTE)
        more, plan.folds, notes = calibration_copies(feeds, model, cfg, data)
        if notes:
            feeds = plan.feeds = more
            plan.notes += notes
        groups = prunable_groups(coupling, plan, cfg.kinds)
        if metric == "latency":
            plan.latency = measure_latency(model, coupling, groups, feeds[0], cfg.provider,
                                           cfg.threads or None, min_keep=cfg.min_keep,
                                           steps={g.id: self._step(g, plan)
                                                  for g in groups})
            cost = plan.latency.full
            plan.notes.append(latency_note(plan.latency))
        elif metric == "macs":
            cost = node_macs(model, coupling.view.shapes)
        else:
            cost = None
        if metric == "params":
            from graphopt.analysis.cost import count_cost

            plan.total = float(count_cost(model, ctx.input_shapes).params)
        else:
            plan.total = plan.latency.total if plan.latency else float(cost.sum())
        if plan.total <= 0:
            raise ConfigError(f"the model's {metric} count as 0 here (unknown shapes? give "
                              "--input-shape), so a budget cannot be met")
        blocks = removable_blocks(model, plan) if "layers" in cfg.kinds and data else []
        if "layers" in cfg.kinds and not data:
            plan.skipped.append(Skip("layers", "layers are removed only with calibration "
                                     "data (their damage is measured)"))
        need = plan.total * (1.0 - fraction)
        ratios = AUTO_RATIOS if cfg.max_ratio is None else (cfg.max_ratio,)
        reused = held_out_search(ctx, self, model, cfg)  # final=all: one round per optimize
        room = [g for g in groups if self._cap(g, plan, ratios[0]) > 0]
        plan_rounds(cfg, model, coupling, room, [b for b, _ in blocks], feeds, given, data,
                    plan, reused)
        for plan.max_ratio in ratios:
            candidates = self._candidates(model, coupling, groups, blocks, feeds, data, cost,
                                          metric, plan, ctx, given)
            best = removable_cost(candidates)
            if need > best * (1 + 1e-9) + 1e-9:
                continue
            # the sum of unit costs over-counts cuts that overlap in one node: the next ratio
            # too when the cut as really counted falls short
            alloc, plan.removed = self._allocate(coupling, candidates, blocks, cost, metric,
                                                 need, plan.latency)
            if plan.removed >= need * (1 - 1e-6):
                break
            best = plan.removed  # every unit allowed is cut and the budget is still not met
        else:
            raise ConfigError(
                f"{metric}={fraction:g} cannot be met: at most {best / plan.total:.1%} of the "
                f"{metric} can go with min_keep={cfg.min_keep}, max_ratio={plan.max_ratio:g} "
                f"and kinds={','.join(cfg.kinds)} (keep at least "
                f"{1 - best / plan.total:.3f})" + (
                    f"; conv channels were cut in blocks of {nchwc_block()} (the CPU's NCHWc "
                    "block, round_to=0): round_to=1 cuts finer" if self._automatic_blocks()
                    else ""))
        if plan.max_ratio != ratios[0]:
            plan.notes.append(f"max_ratio {ratios[0]:g} cannot meet {metric}={fraction:g}: "
                              f"groups may lose up to {plan.max_ratio:g} of their units")
        base, state = candidates, reused
        for _ in range(plan.rounds + (reused is not None)):  # the held-out run's factors
            candidates, state = (scaled(base, state, plan.kinds), state) if reused is not None \
                else self._rescale(model, coupling, groups, blocks, base, alloc, feeds, plan,
                                   given, state)
            alloc, plan.removed = self._allocate(coupling, candidates, blocks, cost, metric,
                                                 need, plan.latency)
        keep_search(ctx, self, model, cfg, state)
        if plan.latency is not None and cfg.checks:
            alloc, plan.removed = self._check_latency(model, coupling, candidates, blocks,
                                                      cost, plan, feeds[0], alloc)
        plan.removal = {g: np.sort(np.asarray(u, dtype=np.int64))
                        for g, u in alloc.removal.items() if u}
        if cfg.select != "once" and data and plan.removal:
            self._sequential(model, coupling, groups, blocks, candidates, alloc, feeds, plan,
                             cost, need)
        plan.blocks = [blocks[i][0] for i in sorted(alloc.layers)]
        if not cfg.round_to and plan.latency is None and cfg.provider == "cpu":
            plan.notes += off_block_note(coupling, plan.removal, plan.kinds, nchwc_block())
        return plan

    def _sequential(self, model, coupling, groups, blocks, candidates, alloc, feeds, plan,
                    cost, need):
        """``select=sequential|realloc`` (``graphopt.prune.sequential``); a re-allocation
        that falls short of the budget as really counted gives way to the allocation's
        counts."""
        from graphopt.prune.sequential import remaining_for, select

        cfg = self.config
        metric = cfg.metric[0]
        weights = self._weights(model, coupling, groups)
        args = dict(damping=cfg.damping, streams=cfg.target == "stream", weights=weights,
                    blocks=[blocks[i][0] for i in sorted(alloc.layers)])
        if cfg.select == "realloc" and not alloc.layers and metric != "latency":
            rest = remaining_for(model, groups, feeds, weights, candidates, need)
            every = {g.id: plan.removal.get(g.id, ()) for g in groups}
            removal, note = select(model, coupling, every, feeds, remaining=rest, **args)
            removal = {g: u for g, u in removal.items() if len(u)}
            shares = {g: unit_shares(coupling, coupling.group(g), cost, metric)
                      for g in removal}
            removed = exact_removed(item_costs(coupling, cost, metric), shares, removal, set())
            if removed >= need * (1 - 1e-6):
                plan.removal, plan.removed = removal, removed
                plan.notes.append(note)
                return
            plan.notes.append(f"select=realloc removed {removed / plan.total:.3f} of the "
                              f"{metric}, short of the budget: the allocation's counts kept")
        plan.removal, note = select(model, coupling, plan.removal, feeds, **args)
        plan.notes.append(note)

    def _check_latency(self, model, coupling, candidates, blocks, cost, plan, feed, alloc):
        """``latency.checked_cut``: time the cut, re-allocate while it misses the budget."""
        cfg = self.config
        total = plan.total

        def time_it(a):
            cut = [blocks[i][0] for i in sorted(a.layers)]
            return time_cut(model, coupling, {g: u for g, u in a.removal.items() if u}, cut,
                            feed, cfg.provider, cfg.threads or None)

        def again(kept):
            need = total * (1.0 - kept)
            if need > removable_cost(candidates):
                return None
            return self._allocate(coupling, candidates, blocks, cost, "latency", need,
                                  plan.latency)

        pick, plan.checks, note = checked_cut((alloc, plan.removed), total, float(cfg.latency),
                                              cfg.checks, time_it, again)
        plan.notes.append(note)
        return pick

    def _automatic_blocks(self) -> bool:
        cfg = self.config
        return (not cfg.round_to and cfg.latency is not None and cfg.provider == "cpu"
                and nchwc_block() > 1)

    def _step(self, group, plan: PrunePlan) -> int:
        """Units per chunk of ``group``: 1 for heads, else what keeps widths multiples of
        ``round_to`` (0: ``round_to`` module doc, 3)."""
        if group.id in plan.heads:
            return 1
        cfg = self.config
        round_to = cfg.round_to
        if not round_to:
            round_to = nchwc_block() if (plan.kinds.get(group.id) == "channels" and
                                         self._automatic_blocks()) else 1
        return _step(group, round_to)

    def _allocate(self, coupling, candidates, blocks, cost, metric, need, table=None):
        """``allocate`` to ``need``, then count what the cut really removes
        (``exact_removed``: units of two groups meeting in one node or weight overlap; with
        a measured latency ``table``, its width response) and ask for the shortfall again,
        until the need is met or nothing more can go."""
        items = item_costs(coupling, cost, metric)
        shares = {gid: unit_shares(coupling, coupling.group(gid), cost, metric)
                  for gid in {c.key for c in candidates if c.kind != "layers"}}  # once a group
        nodes_of = {i: b.nodes for b, i in blocks}
        ask = need
        best = None
        for _ in range(32):  # overlapping cuts (and a width response) converge slowly
            alloc = allocate(candidates, ask)
            dead = set()
            for i in alloc.layers:
                dead |= block_items(coupling.view.model, nodes_of[i], metric)
            removed = table.removed(shares, alloc.removal, dead) if table is not None \
                else exact_removed(items, shares, alloc.removal, dead)
            if best is None or removed > best[1]:
                best = (alloc, removed)
            if removed >= need * (1 - 1e-9) or alloc.removed_cost < ask * (1 - 1e-9):
                break  # met, or the candidates are exhausted
            ask += need - removed
        return best if best[1] < need * (1 - 1e-9) else (alloc, removed)

    def _rescale(self, model, coupling, groups, blocks, candidates, alloc, feeds, plan,
                 given, state):
        """Damages scaled by measured over predicted output damage per group and layer
        (``graphopt.prune.search.rescale``), and what was measured so far."""
        from graphopt.prune.search import SearchState, fold_ids, rescale

        state = state or SearchState()
        out, note = rescale(model, coupling, groups, blocks, candidates, alloc, feeds,
                            plan.kinds, self.config.damping,
                            self._weights(model, coupling, groups),
                            fold_ids(len(feeds), given, self.config.folds), inverses=plan.inverses,
                            subset=plan.probes, state=state)
        plan.notes.append(note)
        return out, state

    def _cap(self, g, plan: PrunePlan, max_ratio: float) -> int:
        """The most units ``g`` may lose (``min_keep``, ``max_ratio``; module doc, 3)."""
        hb = plan.heads.get(g.id)
        keep = max(math.ceil(self.config.min_keep / hb.heads_per_unit), 1) if hb else \
            self.config.min_keep
        return min(int(math.floor(max_ratio * g.size + 1e-9)), g.size - keep)

    def _weights(self, model, coupling, groups) -> dict[str, str] | None:
        """``postnorm``: consumer site output -> the residual sum its LayerNorm reads."""
        if not self.config.postnorm:
            return None
        from graphopt.prune.postnorm import norm_streams
        from graphopt.prune.reconstruct import stream_sums

        return norm_streams(model, stream_sums(model, consumer_outputs(model, groups)))

    def _candidates(self, model, coupling, groups, blocks, feeds, data, cost, metric,
                    plan, ctx, given) -> list[Candidate]:
        cfg = self.config
        layer_of: dict[int, int] = {}
        for b, i in blocks:
            nodes = set(b.nodes)
            for g in groups:
                if g.position in nodes:
                    layer_of[g.id] = i
        if data:
            weights = self._weights(model, coupling, groups)
            plan.inverses = {} if plan.rounds and cfg.folds == 1 else None
            scores, fallback, damage, note = shared_scores(
                model, coupling, groups, cfg.score, feeds, given, [b for b, _ in blocks],
                cfg=cfg, ctx=ctx, damping=cfg.damping, max_ratio=plan.max_ratio,
                weights=weights, keep=plan.inverses, owner=self)
            plan.notes += [note] if note else []
            if fallback:
                scores.update(unit_scores(coupling, fallback, "activation", feeds=feeds))
        else:
            scores = unit_scores(coupling, groups, "l1")
        macs = node_macs(model, coupling.view.shapes) if (plan.latency is not None and
                                                          not data) else None
        out: list[Candidate] = []
        for g in groups:
            cap = self._cap(g, plan, plan.max_ratio)
            if cap <= 0:
                continue
            s = np.asarray(scores[g.id], dtype=np.float64)
            order = np.argsort(s, kind="stable")
            step = self._step(g, plan)
            per_unit = unit_costs(coupling, g, cost, metric)
            if macs is not None:  # a weight-only guess weighs a unit by the compute it holds
                s = s * max(unit_costs(coupling, g, macs, "macs"), 1e-30)
            share = unit_shares(coupling, g, cost, metric) if plan.latency else None
            pos = 0
            for k, (units, dmg, c) in enumerate(chunks(order, s, per_unit, cap, step, g.size)):
                if share is not None:  # what this chunk saves on the measured response
                    c = plan.latency.chunk_cost(share, pos, len(units))
                pos += len(units)
                out.append(Candidate(plan.kinds[g.id], g.id, units, dmg, c, k,
                                     layer_of.get(g.id)))
        if blocks:
            for b, i in blocks:
                out.append(Candidate("layers", i, (), damage[b.exit],
                                     block_cost(model, b.nodes, cost, metric)))
        return out
