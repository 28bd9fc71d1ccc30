"""``search=auto``: measured sensitivity runs when its probes' estimated CPU time is small.

The search's cost is its probes (``graphopt.prune.sensitivity.measure``: each probe copies
the model, rewrites its edit, makes sessions and runs the graph after its edit on the
probe feeds). It is estimated before the scores, from the model and feeds alone, so the
same model and calibration always decide the same way (no timing at run time):

1. ``probe_work``: what the first round runs, counted at each probe feed's own input
   shapes (padding included: it is computed): the MACs (``graphopt.analysis.cost``: Conv,
   Gemm, MatMul, attention) and the output elements of the nodes each probe runs. Every
   group with readable consumers and room to lose units is counted as probed (the search
   probes each one, ``graphopt.prune.search``) and every removable layer too (it probes
   those the allocation could reach: an upper bound), each over the nodes its edit
   reaches (``graphopt.prune.suffix``: a group's consumers and what reads them, a
   bypassed layer's readers and what reads them), plus one run of the whole original
   (the reference outputs; not the bias Add an edit inserts after a consumer that has
   none: one elementwise node); and one set-up per probe (a copy of the model's weight bytes,
   its sessions). ``folds=N`` runs every probe on the whole graph and all feeds, with one
   more forward for the folds' Gram sums, and a set-up per fold of each group. Shapes the
   inference cannot give at a feed's sizes leave the work unknown (infinite: not small).
2. ``Work.seconds``, in CPU seconds of this process (every thread):
   MACs / ``MACS_PER_SECOND`` + elements / ``ELEMENTS_PER_SECOND``
   + set-ups × (``SETUP_SECONDS`` + weight bytes × ``SECONDS_PER_BYTE``).
   Measured by ``benchmarks/bench_search_cost.py`` (the round's ``measure`` timed in
   parts: the probes' copies and sessions, the runs) on the two ends of what we run: the
   PP-OCR classifier (elementwise-bound: 23.2 GMAC, 4.21 G elements, 3.6 CPU s of runs;
   0.018 s per set-up at 0.54 MB) and BERT-base (GEMM-bound: 2.59 TMAC, 10.95 G elements,
   52 CPU s of runs; 0.67 s per set-up at 437 MB): the two runs' equations give 59 GMAC
   and 1.31 G elements per CPU second, the two set-ups 0.017 s + 1.5 ns per byte.
   MiniLM, not fitted, checks it: 10.6 s estimated / 10.3-10.9 measured on the mirror's
   128 sentences, 5.4 / 6.2-6.5 on the shipped ones (benchmarks/RECONSTRUCT.md).
3. ``decide``: ``search="auto"`` runs one round when the estimate is at most
   ``SECONDS_BOUND`` (30 CPU s): a default refinement takes at most a quarter of the 2
   minutes the issue allows a base-sized pass (2 cores), and so fits in what BERT-base's
   own pass (82 s wall quiet) leaves under that target, however many cores the round
   uses. ``search=N`` forces N rounds (0: off). Without calibration data there is nothing
   to measure: no round runs, whatever the setting.

The decision, the estimate and the bound go into the pass report (``details["search"]``
and a note).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import math

import numpy as np
import onnx

from ..data.gram import constants
from ..data.segments import _readers
from ..ir.model import typed_bytes
from .budget import node_macs
from .scores import _consumers
from .search import feed_samples

MACS_PER_SECOND = 5.9e10  # module doc, 2
ELEMENTS_PER_SECOND = 1.31e9
SETUP_SECONDS = 0.017
SECONDS_PER_BYTE = 1.5e-9
SECONDS_BOUND = 30.0  # module doc, 3


@dataclass
class Work:
    """The first round's estimated runs: ``macs`` and ``elements`` (the outputs the nodes
    run write) in all, over ``probes`` probes (``groups`` of them groups) on ``samples``
    samples (the first axis of each probe feed); ``setups``: the probe copies and sessions
    made (``probes``, times ``folds`` for cross-fitted groups), each copying the model's
    ``weight_bytes`` (its initializers' and Constant nodes' values)."""

    macs: float
    probes: int
    groups: int
    samples: int
    elements: float = 0.0
    setups: int = 0
    weight_bytes: float = 0.0

    @property
    def seconds(self) -> float:
        """The estimate in CPU seconds (module doc, 2)."""
        return (self.macs / MACS_PER_SECOND + self.elements / ELEMENTS_PER_SECOND
                + self.setups * (SETUP_SECONDS + self.weight_bytes * SECONDS_PER_BYTE))


def _reached(model, readers, starts: Sequence[int], skip: frozenset = frozenset()) -> set[int]:
    """``starts`` and every node reading what they (transitively) make, but ``skip``."""
    seen: set[int] = set()
    todo = [i for i in starts if i not in skip]
    while todo:
        i = todo.pop()
        if i in seen:
            continue
        seen.add(i)
        for o in model.graph.node[i].output:
            todo += [j for j in readers.get(o, ()) if j not in seen and j not in skip]
    return seen


def _elements(model, shapes) -> np.ndarray:
    """Per node, the elements of its outputs whose shapes are known at ``shapes``."""
    out = np.zeros(len(model.graph.node))
    for i, node in enumerate(model.graph.node):
        for name in node.output:
            dims = shapes.get(name)
            if dims is not None and all(isinstance(d, int) for d in dims):
                out[i] += float(np.prod(dims, dtype=np.float64))
    return out


def _feed_macs(model, feed: Mapping[str, np.ndarray], cache: dict
               ) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-node (MACs, output elements) at ``feed``'s input shapes (one shape inference
    per distinct shape); None when the inference fails there."""
    from ..analysis.shapes import tensor_shapes

    names = {vi.name for vi in model.graph.input}
    shapes = tuple(sorted((k, tuple(np.shape(v))) for k, v in feed.items() if k in names))
    if shapes not in cache:
        try:
            known = tensor_shapes(model, dict(shapes))
            cache[shapes] = (node_macs(model, known), _elements(model, known))
        except Exception:  # noqa: BLE001 - an inference that fails leaves no estimate
            cache[shapes] = None
    return cache[shapes]


def probe_work(model: onnx.ModelProto, coupling, groups, blocks, feeds, subset=None,
               folds: int = 1) -> Work:
    """The first search round's estimated work (module doc, 1). ``groups``: those with
    room to lose units; ``blocks``: the removable layers; ``subset``: indices of the probe
    feeds (None: all)."""
    inits = constants(model)
    starts = []
    for g in groups:
        found = _consumers(model, coupling, g, inits)
        if found is not None:
            starts.append(([site.node for site, _ in found], frozenset()))
    n_groups = len(starts)
    readers = _readers(model.graph)
    for b in blocks:  # a bypassed layer: its exit's readers read its entry instead
        starts.append((readers.get(b.exit, []), frozenset(b.nodes)))
    reach = [np.fromiter(_reached(model, readers, nodes, skip), np.int64)
             for nodes, skip in starts]
    feeds = list(feeds)
    if folds > 1:
        subset = None
    chosen = [feeds[i] for i in subset] if subset is not None else feeds
    cache: dict = {}
    total = np.zeros(2)  # MACs, elements
    for feed in chosen:
        counts = _feed_macs(model, feed, cache)
        if counts is None:  # unknown work is not small: ``decide`` says so
            total[:] = math.inf
            break
        for k, per_node in enumerate(counts):
            whole = float(per_node.sum())
            if folds > 1:  # every probe on the whole graph, the reference and the Gram sums
                total[k] += whole * (len(starts) + 2)
            else:
                total[k] += whole + sum(float(per_node[r].sum()) for r in reach)
    setups = len(starts) + (n_groups * (folds - 1) if folds > 1 else 0)
    return Work(float(total[0]), len(starts), n_groups, sum(feed_samples(chosen)),
                elements=float(total[1]), setups=setups,
                weight_bytes=float(sum(typed_bytes(t) for t in inits.values())))


def _si(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.3g} "


def _rates() -> dict:
    return {"macs_per_second": MACS_PER_SECOND, "elements_per_second": ELEMENTS_PER_SECOND,
            "setup_seconds": SETUP_SECONDS, "seconds_per_byte": SECONDS_PER_BYTE}


def decide(setting, data: bool, work: Work | None) -> tuple[int, dict, str]:
    """(rounds to run, ``details["search"]``, the report's note) for ``search=setting``
    (module doc, 2)."""
    auto = setting == "auto"
    bound = SECONDS_BOUND
    report = {"setting": setting, "ran": False, "rounds": 0, "seconds": None,
              "bound_seconds": bound, "work_macs": None, "work_elements": None,
              "setups": None, "weight_bytes": None, "probes": None, "samples": None,
              "rates": _rates()}
    seconds = math.inf
    if work is not None:
        seconds = work.seconds
        known = not math.isinf(seconds)
        report.update(seconds=seconds if known else None,
                      work_macs=work.macs if known else None,
                      work_elements=work.elements if known else None,
                      setups=work.setups, weight_bytes=work.weight_bytes,
                      probes=work.probes, samples=work.samples)
    if not data:
        report["reason"] = "no calibration data: nothing to measure"
        return 0, report, ""
    within = seconds <= bound
    rounds = (1 if within else 0) if auto else int(setting)
    report.update(ran=rounds > 0, rounds=rounds)
    if math.isinf(seconds):
        estimate = ("its probes' work could not be estimated (no shapes inferred at the "
                    "probe feeds' sizes)")
    else:
        estimate = (f"its probes' estimated cost ≈{seconds:.3g} CPU s ({work.probes} "
                    f"probe{'s' if work.probes != 1 else ''} on {work.samples} samples: "
                    f"{_si(work.macs)}MAC, {_si(work.elements).strip()} elements written, "
                    f"{work.setups} model copies of {_si(work.weight_bytes)}B)")
    limit = f"the bound {bound:g} CPU s"
    if auto:
        report["reason"] = f"auto: estimate {'within' if within else 'past'} the bound"
        note = (f"search=auto: measured sensitivity ran 1 round: {estimate} is within {limit}; "
                "search=0 turns it off" if rounds else
                f"search=auto: measured sensitivity did not run: {estimate} is past {limit}; "
                "search=1 forces it")
    else:
        report["reason"] = f"forced (search={setting})"
        note = (f"search={setting}: measured sensitivity forced {'on' if rounds else 'off'}: "
                f"{estimate}; search=auto runs it within {limit}")
    return rounds, report, note


def plan_rounds(cfg, model, coupling, room, blocks, feeds, given: int, data: bool, plan,
                reused=None) -> None:
    """``plan.probes``, ``plan.rounds``, ``plan.search`` and the note for the ``prune`` pass
    (``cfg``: its config; ``room``: its groups with room to lose units; ``blocks``: the
    removable layers). ``reused``: the ``graphopt.prune.search.SearchState`` the held-out
    run of ``final=all`` measured (``graphopt.prune.shared.held_out_search``): this run
    runs no probe, its scores are scaled by those factors."""
    from .search import probe_subset

    plan.probes = probe_subset(len(feeds), given, cfg.probe_feeds,
                               feed_samples(feeds[:given]))
    work = probe_work(model, coupling, room, blocks, feeds, plan.probes,
                      cfg.folds) if data else None
    plan.rounds, plan.search, note = decide(cfg.search, data, work)
    if reused is not None and data:
        plan.rounds = 0
        plan.search.update(ran=False, rounds=0, reused=len(reused.probed),
                           reason="final=all: the held-out run's measured factors reused")
        note = (f"search: the damage factors the held-out run measured ({len(reused.probed)} "
                "probes) scale this run's scores; no probe ran here (final=all pays one "
                f"round): {reused.note}")
    plan.notes += [note] if note else []
