"""Data-aware importance of the units of coupled groups, from calibration activations.

1. ``obs``: the damage of removing one unit *after the optimal refit* of the layers that
   read it (Optimal Brain Surgeon, structured: SlimGPT, ZipLM, OBC). For a consumer with
   input Gram H = X̃ᵀX̃ (X̃ = [X, 1], damped by λ·mean diag on the X part, the bias free) and
   weight V = [W; b], removing the rows Q of a unit and refitting the rest costs
   tr(V_Qᵀ ((H⁻¹)_QQ)⁻¹ V_Q) of squared output error. It is divided by the consumer's
   output energy tr(VᵀHV), so the score is a relative error, comparable across layers
   (the refit ``graphopt.prune.reconstruct`` does is this same optimum, damped); a unit
   read by several consumers sums them. A conv consumer's unit is its ``kh·kw`` im2col
   columns per channel.
2. ``std``: ‖consumer weight slice‖ · std(activation) per unit, summed over consumers: the
   output energy a unit feeds forward beyond its mean (the mean is what the bias absorbs).
   Raw (not normalized per group), so a global ranking compares layers as they are.

Groups whose consumers are not readable as sites (grouped convs, weights that are not
initializers) are returned in ``fallback`` for the caller's weight- or activation-based
score. Gram sums come from ``graphopt.data.gram.accumulate``; nothing stores activations.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx

from ..data.gram import (
    LinearSite,
    accumulate,
    chunked,
    constants,
    mirror_lower,
    site_dims,
    site_for,
)
from ..data.segments import Segments
from ..runtime.blas import on_one_blas_thread, on_one_blas_thread_each

logger = logging.getLogger(__name__)

DATA_METHODS = ("obs", "std")


def _consumers(model: onnx.ModelProto, coupling, group, inits
               ) -> list[tuple[LinearSite, np.ndarray]] | None:
    """(site, [units, q] K-row indices) per consumer of ``group``; None if one is not a site."""
    out = []
    for m in group.members_with_role("in"):
        idx = m.slot.use[0]
        site, _why = site_for(model, idx, inits)
        if site is None:
            return None
        atoms = group.index[m]  # [units, width] indices on the weight's input axis
        if site.op == "Conv":
            k2 = site.kernel[0] * site.kernel[1]
            rows = (atoms[:, :, None] * k2 + np.arange(k2)).reshape(atoms.shape[0], -1)
        else:
            rows = atoms
        out.append((site, rows))
    return out or None


def damping_diagonal(h: np.ndarray, damping: float) -> np.ndarray:
    """What OBS adds to H's diagonal: λ·mean diag on the X part, the bias row free (both
    with a 1e-10 floor)."""
    k = h.shape[0] - 1
    scale = float(np.mean(np.diag(h)[:k])) or 1.0
    d = np.full(k + 1, damping * scale + 1e-10 * scale)
    d[-1] = 1e-10 * scale
    return d


def damped_inverse(h: np.ndarray, damping: float) -> np.ndarray:
    """(H + ``damping_diagonal``)⁻¹: the inverse every OBS step here starts from (module
    doc, 1)."""
    return _inverse(h, damping_diagonal(h, damping))


@on_one_blas_thread  # its many small products (graphopt.runtime.blas)
def _obs_greedy(h: np.ndarray, v: np.ndarray, rows: np.ndarray, damping: float,
                limit: int, steps: int = 48, refresh: float = 0.5,
                picked: list | None = None, inverse: np.ndarray | None = None) -> np.ndarray:
    """Greedy structured OBS on one consumer (module doc, 1): units are removed lowest
    damage first, a few at a time (about ``steps`` rounds), each round updating the inverse
    Hessian and the weights as the refit would, so a unit's score is its damage given the
    units removed before it. Scores are made non-decreasing in removal order (a ranking by
    score then removes units in that order); units past ``limit`` score above all others.

    Removing the rows C downdates the inverse G by G_:C (G_CC)⁻¹ G_C: (OBS). The downdates
    are kept as a factor (``current = G − FᵀF``, F grown by the rows ``L⁻¹ G_C:`` with L
    the Cholesky factor of the current G_CC) and applied to G in one product when F has
    ``refresh`` times as many rows as G has left (G and the weights are then cut to the
    rows not yet removed: a removed row is never read again). A round then reads F and a
    few rows of G, not the whole K² inverse; the numbers are those of the explicit
    downdate every round, to float rounding. ``picked``: the units are appended to it in
    the order they are removed."""
    k = h.shape[0] - 1
    g = damped_inverse(h, damping) if inverse is None else inverse  # read, never written
    v = v.copy()
    units, q = rows.shape
    alive = np.ones(units, bool)
    score = np.zeros(units)
    running = 0.0
    removed = 0
    limit = min(limit, units - 1)
    blocks = g[rows[:, :, None], rows[:, None, :]]  # [units, q, q] of the current inverse
    # g, v and F's columns are on the rows ``kept`` (original indices; ``at`` maps an
    # original index to its position), cut down to the rows left at each refresh
    kept = np.arange(k + 1)
    at = np.arange(k + 1)
    stay = np.ones(k + 1, bool)
    most = -(-units // steps) * q
    factor = np.empty((int(refresh * (k + 1)) + most, k + 1))
    rank = 0
    while removed < limit:
        idx = np.flatnonzero(alive)
        dmg = _damages(blocks[idx], v, at[rows[idx]])
        take = min(max(1, -(-len(idx) // steps)), limit - removed)
        order = np.argsort(dmg, kind="stable")[:take]
        for j, dj in zip(idx[order], dmg[order]):
            running = max(running, float(dj))
            score[j] = running
        if picked is not None:
            picked.extend(int(j) for j in idx[order])
        c = at[rows[idx[order]].ravel()]
        cols = g[c] - factor[:rank, c].T @ factor[:rank, :len(kept)]  # current rows C
        inv_lower = _inv_cholesky(cols[:, c])
        w = inv_lower @ cols  # [t, kept]: this round's downdate is wᵀw
        v -= w.T @ (inv_lower @ v[c])
        factor[rank:rank + len(c), :len(kept)] = w
        rank += len(c)
        alive[idx[order]] = False
        removed += take
        stay[c] = False
        rest = np.flatnonzero(alive)
        wr = w[:, at[rows[rest]]]  # [t, rest, q]
        blocks[rest] -= np.einsum("tuq,tup->uqp", wr, wr)
        left = np.flatnonzero(stay[:len(kept)])
        if rank >= refresh * len(left) and removed < limit:
            f = np.ascontiguousarray(factor[:rank, left])
            g = g[np.ix_(left, left)]
            g -= f.T @ f
            v = v[left]
            kept = kept[left]
            at[kept] = np.arange(len(kept))
            stay[:] = True
            rank = 0
    rest = np.flatnonzero(alive)
    if len(rest):
        score[rest] = running + 1e-9 + np.maximum(_damages(blocks[rest], v, at[rows[rest]]),
                                                  0)
    return score


@on_one_blas_thread  # graphopt.runtime.blas: 2-8x faster than threaded on a busy machine
def _inverse(h: np.ndarray, d: np.ndarray) -> np.ndarray:
    """(h + diag(d))⁻¹ for a symmetric positive definite sum: LAPACK's Cholesky inverse
    (potrf/potri, half the flops of a general inverse) where scipy is installed."""
    a = h.copy()
    a.flat[::a.shape[0] + 1] += d
    try:
        from scipy.linalg import lapack
    except ImportError:
        return np.linalg.inv(a)
    c, info = lapack.dpotrf(a, lower=True, overwrite_a=True, clean=False)
    if info == 0:
        inv, info = lapack.dpotri(c, lower=True, overwrite_c=True)
    if info != 0:  # not positive definite to rounding: the general inverse
        a = h.copy()
        a.flat[::a.shape[0] + 1] += d
        return np.linalg.inv(a)
    return mirror_lower(inv)


def _damages(blocks: np.ndarray, v: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """tr(V_Qᵀ ((H⁻¹)_QQ)⁻¹ V_Q) per unit (``blocks`` its (H⁻¹)_QQ, ``rows`` its Q)."""
    if rows.shape[1] == 1:
        energy = np.einsum("ij,ij->i", v, v)
        return energy[rows[:, 0]] / np.maximum(blocks[:, 0, 0], 1e-300)
    vq = v[rows]  # [units, q, N]
    return np.einsum("uqn,uqn->u", vq, np.linalg.solve(blocks, vq))


def _inv_cholesky(b: np.ndarray) -> np.ndarray:
    """L⁻¹ with L Lᵀ = ``b`` (symmetric positive definite up to rounding; a matrix that
    rounding left indefinite gets its eigenvalues floored instead)."""
    b = (b + b.T) / 2
    try:
        return np.linalg.inv(np.linalg.cholesky(b))
    except np.linalg.LinAlgError:
        lam, vec = np.linalg.eigh(b)
        lam = np.maximum(lam, 1e-300 + 1e-12 * max(float(lam.max()), 0.0))
        return (vec / np.sqrt(lam)).T


def _energy(h: np.ndarray, v: np.ndarray) -> float:
    return float(np.einsum("ij,ij->", v, h @ v))


def data_scores(model: onnx.ModelProto, coupling, groups: Sequence, method: str,
                feeds: Sequence[Mapping[str, np.ndarray]], *, damping: float = 0.1,
                max_ratio: float = 0.9, norms: Mapping[str, float] | None = None,
                weights: Mapping[str, str] | None = None,
                observe: Mapping[str, Callable[[int, np.ndarray], None]] | None = None,
                keep: dict | None = None, upto: int | None = None,
                early: dict | None = None) -> tuple[dict[int, np.ndarray], list]:
    """Scores per group id by ``method`` (module doc), and the groups it cannot score.

    ``obs`` damage is squared error per row (token, pixel) of the consumer's output, divided
    by ``norms[site]`` when given (the mean row energy of the stream that output joins), else
    by the consumer's own output energy for a conv (relative) and by 1 otherwise.
    ``weights``: rows weighted as ``graphopt.data.gram.accumulate``'s (post-norm error,
    ``graphopt.prune.postnorm``); ``norms`` should then be weighted the same way.
    ``observe``: more tensors to hand over feed by feed (``accumulate``'s), each fetched
    with the chunk of sites that reaches it in graph order, so the caller's statistics
    share these runs. Which sites ``norms`` has is read at once, its values only after
    every capture (so it may be filled by ``observe``: ``graphopt.prune.streams.StreamStats``).
    ``keep``: filled with each ``obs`` site's ``damped_inverse`` (site output -> array;
    float32 when the float32 products are used) for a later user (the search's probes).
    ``early`` (a dict, with ``upto``): ``early["scores"]`` is set to the scores of the first
    ``upto`` feeds, normalized by ``early["norms"]``, from the same capture runs (the
    sums ``accumulate`` had after those feeds): what a call on those feeds alone returns."""
    inits = constants(model)
    plan: dict[int, list[tuple[LinearSite, np.ndarray]]] = {}
    fallback = []
    for g in groups:
        consumers = _consumers(model, coupling, g, inits)
        if consumers is None:
            fallback.append(g)
        else:
            plan[g.id] = consumers
    sites = {s.output: s for cs in plan.values() for s, _ in cs}
    if not sites:
        if early is not None:
            early["scores"] = {}
        return {}, fallback
    feeds = list(feeds)
    readers: dict[str, list[tuple[int, np.ndarray]]] = {}
    for gid, consumers in plan.items():
        for site, rows in consumers:
            readers.setdefault(site.output, []).append((gid, rows))
    dims = {name: site_dims(model, s, inits) for name, s in sites.items()}
    runner = Segments(feeds)  # chunks in graph order, each running on from the one before
    order = sorted(sites.values(), key=lambda s: s.node)
    chunks_ = chunked(order, dims)
    watch = _watch_by_chunk(model, chunks_, observe or {})
    parts: list = []  # (gid, site output, per-unit damage, how it is normalized, divisor)
    early_parts: list = []  # the same, of the first ``upto`` feeds (``early``)
    for chunk, seen in zip(chunks_, watch):  # one chunk of Gram sums at a time
        # float32 Gram products (summed in float64) where the damping dwarfs their
        # rounding (MiniLM macs=0.6, the PP-OCR classifier at macs=0.8: same fidelity to
        # 4 digits); a near-zero damping (exactly dependent units) needs float64
        snaps = {} if early is not None else None
        stats = accumulate(model, chunk, feeds, weights=weights, segments=runner,
                           observe=seen, single=damping >= 1e-3, upto=upto, early=snaps)
        jobs, into = [], []  # scored side by side, added in this order (_site_job)
        for site in chunk:
            jobs.append(_site_job(model, inits, site, stats[site.output],
                                  readers[site.output], method, damping, max_ratio, norms,
                                  keep is not None))
            into.append((site, parts))
            if snaps is not None:
                jobs.append(_site_job(model, inits, site, snaps.pop(site.output),
                                      readers[site.output], method, damping, max_ratio,
                                      early.get("norms"), False))
                into.append((site, early_parts))
        for (site_parts, inverse), (site, dest) in zip(on_one_blas_thread_each(jobs), into):
            dest.extend(site_parts)
            if inverse is not None:
                keep[site.output] = inverse
        del stats, snaps, jobs
    if early is not None:
        early["scores"] = _totals(coupling, plan, early_parts, early.get("norms"))
    return _totals(coupling, plan, parts, norms), fallback


def _site_job(model, inits, site, st, readers, method, damping, max_ratio, norms, keep):
    """One site's scores as a job for ``on_one_blas_thread_each``, returning (its per-unit
    damages for each group reading it, as ``parts`` entries; its ``damped_inverse`` for
    ``data_scores``' ``keep`` when ``keep``, else None). The sites of a chunk, and a
    site's sums after the first feeds beside those after all of them (``early``), are
    scored independently, so side by side; what runs on BLAS' default threads (a conv's
    output energy) is computed here, before, so its rounding stays that of those threads."""
    v = site.matrix(onnx.numpy_helper.to_array(inits[site.weight])).astype(np.float64)
    node = model.graph.node[site.node]
    bias = np.zeros(v.shape[1])
    if site.op in ("Conv", "Gemm") and len(node.input) > 2 and node.input[2] in inits:
        bias = onnx.numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
        bias = bias.reshape(-1) if bias.size == v.shape[1] else np.zeros(v.shape[1])
    va = np.concatenate([v, bias[None, :]], axis=0)
    own = None
    if method == "obs" and not (norms and site.output in norms):
        own = _energy(st.xtx, va) if site.op == "Conv" else st.n

    def job() -> tuple[list, np.ndarray | None]:
        inverse = kept = None
        parts: list = []
        if keep and method == "obs":
            inverse = damped_inverse(st.xtx, damping)
            kept = inverse.astype(np.float32) if damping >= 1e-3 else inverse
        for gid, rows in readers:
            if method == "obs":
                limit = int(np.ceil(max_ratio * len(rows)))
                dmg = _obs_greedy(st.xtx, va, rows, damping, limit, inverse=inverse)
                if own is None:
                    parts.append((gid, site.output, dmg, "obs", st.n))  # × the norm
                else:
                    parts.append((gid, site.output, dmg, "own", own))
            else:
                n = max(st.n, 1)
                mean = st.xtx[-1, :-1] / n
                var = np.maximum(np.diag(st.xtx)[:-1] / n - mean * mean, 0.0)
                energy = (v * v).sum(1) * var
                parts.append((gid, site.output, energy[rows].sum(1),
                              "std", np.sqrt(energy)[rows].sum(1)))
        return parts, kept
    return job


def _totals(coupling, plan, parts, norms) -> dict[int, np.ndarray]:
    """Scores per group from ``_score_site``'s parts, once the norms are complete."""
    totals = {gid: np.zeros(coupling.group(gid).size) for gid in plan}
    for gid, name, value, kind, extra in parts:
        if kind == "obs":
            totals[gid] += value / max(extra * norms[name], 1e-30)
        elif kind == "own":
            totals[gid] += value / max(extra, 1e-30)
        elif norms and name in norms:  # squared, on the stream's scale
            totals[gid] += value / norms[name]
        else:
            totals[gid] += extra
    return totals


def _watch_by_chunk(model, chunks_, observe) -> list[dict]:
    """``observe`` split over ``chunks_``: each tensor with the first chunk whose last site
    comes after the node making it (the last chunk when none does)."""
    out: list[dict] = [{} for _ in chunks_]
    if not observe:
        return out
    producer = {o: i for i, n in enumerate(model.graph.node) for o in n.output if o}
    ends = [max(s.node for s in c) for c in chunks_]
    for name, take in observe.items():
        at = producer.get(name, -1)
        out[next((i for i, e in enumerate(ends) if e >= at), len(chunks_) - 1)][name] = take
    return out
