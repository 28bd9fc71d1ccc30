"""Measured sensitivity: how much a group's cut really changes the model's outputs.

The OBS scores of ``graphopt.prune.scores`` are local: the error a cut leaves in the
layer right after it (on the residual stream's scale). How much of it reaches the
outputs differs from layer to layer (norms, attention and later layers damp or amplify
it), and a budget's allocation across layers needs the end-to-end figure. This is the
mask search step of Kwon et al. (2022), done by measurement on the ONNX graph instead of
with a task loss's Fisher information:

1. ``Probe``: one group and the units it would lose (the first ``k`` in its removal
   order), or one layer.
2. ``measure``: for each probe, a copy of the model where the group's consumers carry
   the OBS-compensated weights (the units' rows zeroed, the rest updated as the optimal
   damped refit on the calibration Gram would, the bias absorbing the mean), or the
   layer bypassed; the calibration feeds run through it; the relative squared error of
   every output against the original's (padding tokens left out; a softmax output is
   read before its softmax, as logits) is the probe's damage.
   With ``folds``, each fold of the feeds is measured with the compensation solved on
   the other folds' Gram sums (cross-fitted): on MiniLM with ~1500 tokens per fold an FFN
   down projection's compensation loses 8-12× more on held-out rows than on the rows it
   was fit on (an attention output projection 2-3×), which in-sample probes do not see.
3. The caller divides it by the local prediction (the sum of the units' scores) and
   scales the group's scores by that factor before allocating again.

Memory: one copy of the model at a time and the original's outputs on the feeds.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from ..data.gram import accumulate, constants, site_for, token_mask
from .reconstruct import _SiteEdit
from .scores import damped_inverse, damping_diagonal

logger = logging.getLogger(__name__)


@dataclass
class Probe:
    key: tuple  # ("group", gid) or ("layer", position)
    units: np.ndarray | None = None  # unit indices of the group
    block: object | None = None  # a structure block (layer)


def _through(producer, name):
    """The node making ``name``, past ``Identity`` nodes (PP-OCR's classifier writes its
    Softmax through one)."""
    node = producer.get(name)
    while node is not None and node.op_type == "Identity":
        node = producer.get(node.input[0])
    return node


def measured_tensors(model: onnx.ModelProto) -> list[str]:
    """The graph outputs, with a ``Softmax``/``LogSoftmax`` output (through ``Identity``
    nodes) replaced by its input: a confident classifier's probabilities hide how far its
    logits moved (PP-OCR's direction classifier: its channel groups measured ×0.001-0.1 of
    their prediction on the probabilities)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    out = []
    for o in model.graph.output:
        node = _through(producer, o.name)
        out.append(node.input[0] if node is not None and
                   node.op_type in ("Softmax", "LogSoftmax") else o.name)
    return list(dict.fromkeys(out))


def _outputs(model: onnx.ModelProto, feeds, names) -> list[dict[str, np.ndarray]]:
    from ..data.gram import _run, _session

    session = _session(model, names, ("CPUExecutionProvider",))
    return [dict(zip(names, _run(session, f, names))) for f in feeds]


def _relative_error(feeds, ref, out) -> float:
    num = den = 0.0
    for feed, a, b in zip(feeds, ref, out):
        mask = token_mask(feed)
        for name, y0 in a.items():
            y0 = np.asarray(y0, np.float64)
            y = np.asarray(b[name], np.float64)
            if y.shape != y0.shape or not np.issubdtype(y0.dtype, np.floating):
                continue
            d, e = (y - y0) ** 2, y0 * y0
            if mask is not None and y0.ndim >= 2 and y0.shape[:2] == mask.shape:
                w = mask.reshape(mask.shape + (1,) * (y0.ndim - 2))
                d, e = d * w, e * w
            num += float(d.sum())
            den += float(e.sum())
    return num / max(den, 1e-30)


def _compensated(h: np.ndarray, v: np.ndarray, rows: np.ndarray, damping: float) -> np.ndarray:
    """V after removing ``rows`` with the optimal damped refit (OBS, all rows at once): the
    kept rows move by A_kk⁻¹ A_kq V_q (A = H + damping; one Cholesky solve of the kept
    block, the same as V − A⁻¹_:q (A⁻¹_qq)⁻¹ V_q without the whole inverse)."""
    k = h.shape[0] - 1
    a = np.asarray(h, dtype=np.float64) + np.diag(damping_diagonal(h, damping))
    q = np.asarray(rows).ravel()
    keep = np.setdiff1d(np.arange(k + 1), q)
    rhs = a[np.ix_(keep, q)] @ v[q]
    try:
        from scipy.linalg import cho_factor, cho_solve

        step = cho_solve(cho_factor(a[np.ix_(keep, keep)], lower=True), rhs)
    except (ImportError, np.linalg.LinAlgError):
        step = np.linalg.solve(a[np.ix_(keep, keep)], rhs)
    out = np.array(v, dtype=np.float64)
    out[keep] += step
    out[q] = 0.0
    return out


def _obs_update(g: np.ndarray, v: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """V after removing ``rows`` with the optimal damped refit, from the damped inverse G:
    V − G_:q (G_qq)⁻¹ V_q (one solve of the removed rows' block)."""
    q = np.asarray(rows).ravel()
    gq = np.asarray(g[:, q], dtype=np.float64)
    out = np.asarray(v, dtype=np.float64) - gq @ np.linalg.solve(gq[q], v[q])
    out[q] = 0.0
    return out


def measure(model: onnx.ModelProto, coupling, probes: Sequence[Probe],
            feeds: Sequence[Mapping[str, np.ndarray]], consumers: Mapping[int, list],
            damping: float = 0.1, weights: Mapping[str, str] | None = None,
            folds: Sequence[int] | None = None,
            inverses: Mapping[str, np.ndarray] | None = None,
            subset: Sequence[int] | None = None) -> dict[tuple, float]:
    """Relative output error of each probe (module doc, 2). ``consumers[gid]``: the
    (site, [units, q] rows) pairs of ``graphopt.prune.scores._consumers``; ``weights``:
    the compensation's Gram rows weighted as ``accumulate``'s (post-norm error).

    ``inverses``: site output -> its ``scores.damped_inverse`` on ``feeds`` at ``damping``
    (the scores' own; else summed and inverted here).
    ``subset``: the indices of the feeds the probes are measured on (the compensation is
    still solved on all). Without ``folds``, each probe runs only the graph after its edit
    (``graphopt.prune.suffix``).

    ``folds`` (one fold id per feed, two folds or more): cross-fitted, as the cut will meet
    data it was not fit on. Each fold's feeds are measured with the compensation solved on
    the Gram sums of the other folds only, so a refit that fits the calibration's noise
    (a wide consumer, few tokens) is charged what it costs on held-out rows. Without
    ``folds`` the compensation is fit and measured on the same feeds."""
    if folds is not None:
        return _measure_folds(model, probes, feeds, consumers, damping, weights, folds)
    from .suffix import run_suffixes

    feeds = list(feeds)
    scored = feeds if subset is None else [feeds[i] for i in subset]
    names = measured_tensors(model)
    sites = {s.output: s for p in probes if p.units is not None
             for s, _ in consumers.get(p.key[1], [])}
    missing = [s for name, s in sites.items() if inverses is None or name not in inverses]
    if missing:
        more = accumulate(model, missing, feeds, weights=weights)
        inverses = {**(inverses or {}), **{name: damped_inverse(st.xtx, damping)
                                           for name, st in more.items()}}
    producer = {o: i for i, n in enumerate(model.graph.node) for o in n.output}

    def at(p):  # where the probe's edit starts, in graph order
        if p.block is not None:
            return producer.get(p.block.entry, -1)
        return min((s.node for s, _ in consumers.get(p.key[1], [])), default=-1)

    failed = set()

    def works():
        for p in sorted(probes, key=at):
            try:
                yield (p.key, *_edited(model, p, consumers, inverses))
            except Exception as exc:  # noqa: BLE001 - a probe not built is not measured
                logger.info("probe %s not measured: %s", p.key, exc)
                failed.add(p.key)

    ref, got = run_suffixes(model, works(), scored, names)
    return {key: _relative_error(scored, ref, out) for key, out in got.items()
            if key not in failed}


def _edited(model, p: Probe, consumers, inverses) -> tuple[onnx.ModelProto, set]:
    """A copy of ``model`` with the probe's cut: its layer bypassed, or its group's consumers
    OBS-compensated with ``inverses`` (``measure``'s); and the initializers it rewrote."""
    return _with_cut(model, p, consumers,
                     lambda name, v, rows: _obs_update(inverses[name], v, rows))


def _with_cut(model, p: Probe, consumers, compensate) -> tuple[onnx.ModelProto, set]:
    """``_edited`` with ``compensate(site output, V, removed rows) -> V`` as the refit."""
    from .blocks import remove_blocks

    work = onnx.ModelProto()
    work.CopyFrom(model)
    touched: set[str] = set()
    if p.block is not None:
        remove_blocks(work, [p.block])
        return work, touched
    # last site first: a bias Add written after a MatMul moves the nodes after it
    for site, rows in sorted(consumers.get(p.key[1], []), key=lambda c: -c[0].node):
        edit = _SiteEdit(work, site_for(work, site.node, constants(work))[0])
        v = np.concatenate([edit.w0, edit.b0[None, :]], axis=0)
        v = compensate(site.output, v, rows[p.units])
        edit.write(v[:-1], v[-1], moved_bias=True)
        touched.update(edit.node.input)
        if edit.add is not None:
            touched.update(edit.add[0].input)
    return work, touched


def _measure_folds(model, probes, feeds, consumers, damping, weights, folds):
    """``measure`` cross-fitted over ``folds`` (whole-model runs per fold)."""
    feeds = list(feeds)
    fold = np.asarray(folds, np.int64)
    parts = [np.flatnonzero(fold == k) for k in np.unique(fold)]
    names = measured_tensors(model)
    ref = _outputs(model, feeds, names)
    sites = {s.output: s for p in probes if p.units is not None
             for s, _ in consumers.get(p.key[1], [])}
    # Gram sums per fold; a fold's compensation is solved on the others' (all when one)
    grams = [accumulate(model, list(sites.values()), [feeds[i] for i in idx],
                        weights=weights) if sites else {} for idx in parts]
    out: dict[tuple, float] = {}
    for p in probes:
        got: list = [None] * len(feeds)
        try:
            for k, idx in enumerate(parts if p.block is None else [np.arange(len(feeds))]):
                # a bypassed layer fits nothing: one run measures every feed
                others = [g for j, g in enumerate(grams) if j != k or len(parts) == 1]
                work, _ = _with_cut(model, p, consumers, lambda name, v, rows: _compensated(
                    np.sum([g[name].xtx for g in others], axis=0), v, rows, damping))
                for i, o in zip(idx, _outputs(work, [feeds[i] for i in idx], names)):
                    got[i] = o
            out[p.key] = _relative_error(feeds, ref, got)
        except Exception as exc:  # noqa: BLE001 - a probe that does not run is not measured
            logger.info("probe %s not measured: %s", p.key, exc)
    return out
