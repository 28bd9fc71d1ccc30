"""``optimize(final="auto")``: the passes run again on all calibration when that is cheap.

A lossy run with a held-out share optimizes the model from the rest of the calibration and
measures it on the share. ``final="all"`` then runs the passes again on all of it and writes
that model (more data, its figure that of the first model); ``final="rest"`` writes the
first model, whose figure is exact. The second run costs about what the first did (the
scores' capture is shared, ``graphopt.prune.shared``; the refit is not): on BERT-base with
256 sentences it took the CLI from 103 s to 158 s (2 cores, benchmarks/README.md, session
10), past the 2 minutes a base-sized model has. ``final="auto"`` (the default) runs it
unless even a lower bound of its cost is large, the way ``search=auto`` decides on an
estimate (``graphopt.prune.search_work``):

1. ``second_run``: the lower bound, before any pass runs, from the model and the feeds
   alone (the same model and calibration always decide the same way; nothing is timed).
   The second run's refit runs the original (its targets) and the cut model (its inputs)
   over the pass's calibration feeds (the user's and the copies the pass adds:
   ``Pass.data_feeds``): ``REFIT_FORWARDS`` forwards of the original over those feeds,
   counted as the MACs at the analysis shapes (``graphopt.analysis.cost``) times the feeds'
   size over the analysed one (elements of the largest input; attention's quadratic term
   is left out), at ``search_work.MACS_PER_SECOND``. It is the forwards alone, not the
   run: the run also makes sessions, copies the model, sums Gram products and solves,
   checks. Measured on this stack, the second run took 82 CPU s on BERT-base with 256
   sentences against 39.4 counted, and 45 CPU s on MiniLM with 128 sentences against 4.0
   (its fixed costs dominate on a small model).
2. ``decide``: the second run goes ahead unless the count passes
   ``search_work.SECONDS_BOUND`` (30 CPU s, the bound a default refinement has): when its
   forwards alone take more than a quarter of the 2 minutes, the run is not small.
   BERT-base on 256 sentences (39.4): the model from the rest is written, with its exact
   figure (the CLI: 158 s with the second run, 90-103 s without it, on a machine where the
   pass alone takes 101-103 s). MiniLM on 128 sentences (4.0), the PP-OCR classifier on 128
   text lines (0.07): both run again, and MiniLM's figure is the one ``final="all"`` gives
   (0.9467 cosine on the mirror, against 0.94 targeted).

The decision and the count go into ``report.metadata["fidelity"]["final_run"]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx

#: forwards of the original a refit runs per calibration feed (module doc, 1)
REFIT_FORWARDS = 2


def _size(feed: Mapping[str, np.ndarray], names: Sequence[str]) -> int:
    """Elements of the feed's largest model input."""
    return max((int(np.size(feed[n])) for n in names if n in feed), default=0)


def second_run(model: onnx.ModelProto, shapes: Mapping[str, tuple], feeds, passes) -> dict:
    """The lower bound of the run on all calibration (module doc, 1): ``{"seconds", "macs",
    "feeds"}`` (``seconds`` None when the model's MACs are not known at ``shapes``)."""
    from .prune.search_work import MACS_PER_SECOND

    feeds = list(feeds)
    for p in passes:  # the first lossy pass that adds copies of its own says which
        more = getattr(p, "data_feeds", None)
        if not getattr(p, "lossless", True) and more is not None:
            feeds = list(more(model, feeds))
            break
    names = [vi.name for vi in model.graph.input]
    macs = _macs(model, shapes)
    analysed = _analysed_size(model, shapes, feeds, names)
    if macs <= 0 or analysed <= 0:
        return {"seconds": None, "macs": None, "feeds": len(feeds)}
    total = REFIT_FORWARDS * macs * sum(_size(f, names) for f in feeds) / analysed
    return {"seconds": total / MACS_PER_SECOND, "macs": total, "feeds": len(feeds)}


def _macs(model, shapes) -> float:
    """The model's MACs at the analysis shapes; 0 where they cannot be counted."""
    from .analysis.cost import count_cost

    try:
        return float(count_cost(model, dict(shapes) or None).macs)
    except Exception:  # noqa: BLE001 - an inference that fails leaves no estimate
        return 0.0


def _analysed_size(model, shapes, feeds, names) -> int:
    """Elements of the largest input at the analysis shapes (the first feed's sizes where
    ``shapes`` leaves a dim open)."""
    best = 0
    for n in names:
        if n in shapes:
            best = max(best, int(np.prod(shapes[n], dtype=np.int64)))
        elif feeds and n in feeds[0]:
            best = max(best, int(np.size(feeds[0][n])))
    return best


def decide(final: str, model, shapes, feeds, passes) -> tuple[bool, dict]:
    """(run the passes again on all calibration, ``fidelity["final_run"]``) for ``final``
    (module doc, 2): "all" always, "rest" never, "auto" within the bound."""
    from .prune.search_work import SECONDS_BOUND

    if final != "auto":
        return final == "all", {"setting": final, "again": final == "all"}
    work = second_run(model, shapes, feeds, passes)
    seconds = work["seconds"]
    again = seconds is not None and seconds <= SECONDS_BOUND  # unknown is not small
    return again, {"setting": "auto", "again": again, "estimate_seconds": seconds,
                   "estimate_macs": work["macs"], "feeds": work["feeds"],
                   "bound_seconds": SECONDS_BOUND}


def note(decision: Mapping, every: int, apart: int) -> str | None:
    """The report's line on an ``auto`` decision, or None for a forced one."""
    if decision.get("setting") != "auto":
        return None
    seconds, bound = decision.get("estimate_seconds"), decision["bound_seconds"]
    if decision["again"]:
        return (f"final=auto: optimized again on all {every} calibration samples: its "
                f"refit's forwards were counted at ≈{seconds:.3g} CPU s, within the bound of "
                f"{bound:g}; --final rest skips it")
    why = ("its cost could not be counted (no MACs at the analysis shapes): unknown work "
           "is not small" if seconds is None else
           f"its refit's forwards alone were counted at ≈{seconds:.3g} CPU s, past the bound "
           f"of {bound:g} CPU s")
    return (f"final=auto: the written model is the one optimized from the other "
            f"{every - apart} calibration samples, so its figure is exact; it was not "
            f"optimized again on all {every}: {why} (--final all runs it)")
