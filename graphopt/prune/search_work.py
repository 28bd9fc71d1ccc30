"""``search=auto``: measured sensitivity runs when its probes' estimated work is small.

The search's cost is its probes' runs (``graphopt.prune.sensitivity.measure``: each probe
runs the graph after its edit on the probe feeds; BERT-base: 35 probes, 40 of the search's
41 s). It is estimated before the scores, from the model alone, so the same model and
calibration always decide the same way (no machine timing):

1. ``probe_work``: MACs (``graphopt.analysis.cost``: Conv, Gemm, MatMul, attention) of
   the runs of the first round, counted at each probe feed's own input shapes (padding
   included: it is computed). Every group with readable consumers and room to lose units
   is counted as probed (the search probes each one, ``graphopt.prune.search``) and every
   removable layer too (it probes those the allocation could reach: an upper bound), each
   over the nodes its edit reaches (``graphopt.prune.suffix``: a group's consumers and
   what reads them, a bypassed layer's readers and what reads them), plus one run of the
   whole original (the reference outputs). ``folds=N`` runs every probe on the whole
   graph and all feeds, with one more forward for the folds' Gram sums. Shapes the
   inference cannot give at a feed's sizes leave the work unknown (infinite: not small).
2. ``decide``: ``search="auto"`` runs one round when that work is at most ``WORK_BOUND``:
   ``AUTO_SECONDS`` (10 s) at ``MACS_PER_SECOND`` (1e10, 10 GMAC/s), a conservative fp32
   rate for onnxruntime on one CPU core: a fifth of one AVX2 core's FMA peak (2 FMA units ×
   8 lanes × 3 GHz = 48 GMAC/s), since the probes run small per-layer graphs with many
   non-MAC ops between the GEMMs. ``search=N`` forces N rounds (0: off). Without
   calibration data there is nothing to measure: no round runs, whatever the setting.

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
from .budget import node_macs
from .scores import _consumers
from .search import feed_samples

MACS_PER_SECOND = 1e10
AUTO_SECONDS = 10.0
WORK_BOUND = MACS_PER_SECOND * AUTO_SECONDS


@dataclass
class Work:
    """The first round's estimated runs: ``macs`` in all, over ``probes`` probes (``groups``
    of them groups) on ``samples`` samples (the first axis of each probe feed)."""

    macs: float
    probes: int
    groups: int
    samples: int


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


def _feed_macs(model, feed: Mapping[str, np.ndarray], cache: dict) -> np.ndarray | None:
    """Per-node MACs at ``feed``'s input shapes (one shape inference per distinct shape);
    None when the inference fails there."""
    from ..analysis.shapes import tensor_shapes

    names = {vi.name for vi in model.graph.input}
    shapes = tuple(sorted((k, tuple(np.shape(v))) for k, v in feed.items() if k in names))
    if shapes not in cache:
        try:
            cache[shapes] = node_macs(model, tensor_shapes(model, dict(shapes)))
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
    total = 0.0
    for feed in chosen:
        macs = _feed_macs(model, feed, cache)
        if macs is None:  # unknown work is not small: ``decide`` says so
            total = math.inf
            break
        whole = float(macs.sum())
        if folds > 1:  # every probe on the whole graph, the reference and the Gram sums
            total += whole * (len(starts) + 2)
        else:
            total += whole + sum(float(macs[r].sum()) for r in reach)
    return Work(total, len(starts), n_groups, sum(feed_samples(chosen)))


def _si(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.3g} "


def decide(setting, data: bool, work: Work | None) -> tuple[int, dict, str]:
    """(rounds to run, ``details["search"]``, the report's note) for ``search=setting``
    (module doc, 2)."""
    auto = setting == "auto"
    bound = WORK_BOUND
    report = {"setting": setting, "ran": False, "rounds": 0, "work_macs": None,
              "bound_macs": bound, "macs_per_second": MACS_PER_SECOND, "probes": None,
              "samples": None}
    if work is not None:
        report.update(work_macs=None if math.isinf(work.macs) else work.macs,
                      probes=work.probes, samples=work.samples)
    if not data:
        report["reason"] = "no calibration data: nothing to measure"
        return 0, report, ""
    within = work.macs <= bound
    rounds = (1 if within else 0) if auto else int(setting)
    report.update(ran=rounds > 0, rounds=rounds)
    if math.isinf(work.macs):
        estimate = ("its probes' work could not be estimated (no shapes inferred at the "
                    "probe feeds' sizes)")
    else:
        estimate = (f"its probes' estimated work {_si(work.macs)}MAC ({work.probes} "
                    f"probe{'s' if work.probes != 1 else ''} on {work.samples} samples, "
                    f"≈{work.macs / MACS_PER_SECOND:.2g} s at {_si(MACS_PER_SECOND)}MAC/s)")
    limit = f"the bound {_si(bound)}MAC ({AUTO_SECONDS:g} s)"
    if auto:
        report["reason"] = f"auto: work {'within' if within else 'past'} the bound"
        note = (f"search=auto: measured sensitivity ran 1 round: {estimate} is within {limit}; "
                "search=0 turns it off" if rounds else
                f"search=auto: measured sensitivity did not run: {estimate} is past {limit}; "
                "search=1 forces it")
    else:
        report["reason"] = f"forced (search={setting})"
        note = (f"search={setting}: measured sensitivity forced {'on' if rounds else 'off'}: "
                f"{estimate}; search=auto runs it within {limit}")
    return rounds, report, note
