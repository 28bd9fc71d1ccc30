"""Captures that run on from earlier ones (``graphopt.data.segments``), the buffered Gram
sums and the factored greedy OBS: each against the plain computation it replaces.

Chain: ``x[n,160] ─ W1 ─ Relu ─ W2 ─ Relu ─ W3 ─> y`` (160×160 weights: large enough to
reach the session as shared arrays rather than serialized bytes).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphopt.data.gram import GramStats
from graphopt.data.segments import Segments
from graphopt.prune.scores import _obs_greedy
from graphopt.testing import make_model, run

D = 160


def _chain() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    ws = {f"W{i}": (rng.normal(size=(D, D)) / np.sqrt(D)).astype(np.float32) for i in (1, 2, 3)}
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["a1"]),
             helper.make_node("MatMul", ["a1", "W2"], ["h2"]),
             helper.make_node("Relu", ["h2"], ["a2"]),
             helper.make_node("MatMul", ["a2", "W3"], ["y"])]
    return make_model(nodes, {"x": ["n", D]}, ["y"], ws)


def _feeds(count=3):
    rng = np.random.default_rng(1)
    return [{"x": rng.normal(size=(5 + i, D)).astype(np.float32)} for i in range(count)]


def _reference(model, feeds, names):
    """Every tensor in ``names`` from one run of the whole model (extra outputs)."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    for n in names:
        work.graph.output.add().name = n
    return [run(work, f) for f in feeds]


def test_captures_run_on_from_the_last_one_and_match_a_whole_run():
    model, feeds = _chain(), _feeds()
    seg = Segments(feeds)
    first = list(seg.run(model, ["a1"]))
    size_first = seg.last_nodes
    second = list(seg.run(model, ["a2", "h2"]))
    assert (size_first, seg.last_nodes) == (2, 2)  # the second ran W2 and Relu only
    third = list(seg.run(model, ["y", "a1"]))  # a1 is gone (nothing unrun reads it)
    ref = _reference(model, feeds, ["a1", "a2", "h2"])
    for f in range(len(feeds)):
        np.testing.assert_allclose(first[f]["a1"], ref[f]["a1"], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(second[f]["a2"], ref[f]["a2"], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(second[f]["h2"], ref[f]["h2"], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(third[f]["y"], ref[f]["y"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(third[f]["a1"], ref[f]["a1"], rtol=1e-6, atol=1e-6)


def test_invalidate_reruns_what_a_changed_weight_feeds_and_keeps_the_rest():
    model, feeds = _chain(), _feeds()
    seg = Segments(feeds)
    list(seg.run(model, ["a1"]))  # W2's input, as a refit reads it before changing W2
    w2 = next(t for t in model.graph.initializer if t.name == "W2")
    w2.CopyFrom(numpy_helper.from_array(2 * numpy_helper.to_array(w2), "W2"))
    seg.invalidate(model, ["h2"])
    got = list(seg.run(model, ["y"]))
    assert seg.last_nodes == 3  # W2, Relu, W3 again; W1 and its Relu were kept
    ref = _reference(model, feeds, [])
    for f in range(len(feeds)):
        np.testing.assert_allclose(got[f]["y"], ref[f]["y"], rtol=1e-5, atol=1e-5)


def test_hold_keeps_the_inputs_of_the_nodes_a_refit_rewrites():
    """A sequential refit captures W2's input and output, rewrites W2 and captures on:
    without ``hold`` the next capture runs W1 again (a1 was not kept: its reader ran);
    holding a1, W2 runs again from it (the FFN input layer of a BERT refit is not run
    twice). Both give the whole model's values with the new W2; past ``max_bytes`` the
    held tensors are dropped, the frontier is still kept."""
    feeds = _feeds()
    sizes = {}
    for hold in ((), ("a1",)):
        model = _chain()
        seg = Segments(feeds)
        list(seg.run(model, ["a1", "h2"], hold=hold))
        w2 = next(t for t in model.graph.initializer if t.name == "W2")
        w2.CopyFrom(numpy_helper.from_array(2 * numpy_helper.to_array(w2), "W2"))
        seg.invalidate(model, ["h2"])
        got = list(seg.run(model, ["y"]))
        sizes[hold] = seg.last_nodes
        ref = _reference(model, feeds, [])
        for f in range(len(feeds)):
            np.testing.assert_allclose(got[f]["y"], ref[f]["y"], rtol=1e-5, atol=1e-5)
    assert sizes == {(): 5, ("a1",): 3}
    model = _chain()
    one = feeds[0]["x"].nbytes  # the frontier (h2, read by the Relu not run) fits, a1 not
    seg = Segments(feeds, max_bytes=len(feeds) * one * 1.5)
    list(seg.run(model, ["a1", "h2"], hold=["a1"]))
    assert set(seg.kept[0]) == {"h2"}


def test_nothing_is_kept_past_the_memory_bound():
    model, feeds = _chain(), _feeds()
    seg = Segments(feeds, max_bytes=100)
    list(seg.run(model, ["a1"]))
    got = list(seg.run(model, ["a2"]))
    assert seg.last_nodes == 4  # ran from the graph input again
    ref = _reference(model, feeds, ["a2"])
    np.testing.assert_allclose(got[0]["a2"], ref[0]["a2"], rtol=1e-6, atol=1e-6)


def test_gram_sums_over_many_flushes_equal_one_product():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1500, 40)).astype(np.float32)
    t = rng.normal(size=(1500, 3)).astype(np.float32)
    many = GramStats(np.zeros((41, 41)), np.zeros((41, 3)))
    for part in np.array_split(np.arange(1500), 37):  # flushes every 256 rows
        many.add(x[part], t[part])
    xa = np.c_[x.astype(np.float64), np.ones(1500)]
    np.testing.assert_allclose(many.xtx, xa.T @ xa, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(many.xty, xa.T @ t.astype(np.float64), rtol=1e-12, atol=1e-9)
    assert many.n == 1500
    np.testing.assert_allclose(many.tt, float((t.astype(np.float64) ** 2).sum()), rtol=1e-12)
    w = rng.uniform(0.5, 2.0, size=1500)
    weighted = GramStats(np.zeros((41, 41)), np.zeros((41, 3)))
    for part in np.array_split(np.arange(1500), 37):
        weighted.add(x[part], t[part], w[part])
    np.testing.assert_allclose(weighted.xtx, (xa * w[:, None]).T @ xa, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(weighted.xty, (xa * w[:, None]).T @ t, rtol=1e-12, atol=1e-9)


def _greedy_by_definition(h, v, rows, damping, limit, steps=48):
    """Greedy OBS from the definitions: each round the damped Hessian's inverse on the rows
    left and the refit weights are computed afresh (no downdates)."""
    k = h.shape[0] - 1
    scale = float(np.mean(np.diag(h)[:k]))
    hd = h + np.diag(np.r_[np.full(k, (damping + 1e-10) * scale), 1e-10 * scale])
    units, q = rows.shape
    alive = np.ones(units, bool)
    score = np.zeros(units)
    running, removed = 0.0, 0
    limit = min(limit, units - 1)
    gone = np.zeros(k + 1, bool)
    while True:
        r, s = np.flatnonzero(~gone), np.flatnonzero(gone)
        g = np.linalg.inv(hd[np.ix_(r, r)])
        vr = v[r] + (g @ hd[np.ix_(r, s)] @ v[s] if len(s) else 0)
        pos = {orig: i for i, orig in enumerate(r)}
        idx = np.flatnonzero(alive)
        dmg = np.array([float(np.sum(vr[[pos[j] for j in rows[u]]] *
                                     np.linalg.solve(g[np.ix_([pos[j] for j in rows[u]],
                                                              [pos[j] for j in rows[u]])],
                                                     vr[[pos[j] for j in rows[u]]])))
                        for u in idx])
        if removed >= limit:
            score[idx] = running + 1e-9 + np.maximum(dmg, 0)
            return score
        take = min(max(1, -(-len(idx) // steps)), limit - removed)
        order = np.argsort(dmg, kind="stable")[:take]
        for j, dj in zip(idx[order], dmg[order]):
            running = max(running, float(dj))
            score[j] = running
        alive[idx[order]] = False
        gone[rows[idx[order]].ravel()] = True
        removed += take


def test_factored_greedy_obs_equals_the_definition():
    rng = np.random.default_rng(3)
    for k, q in ((120, 1), (60, 3)):
        x = rng.normal(size=(400, k)) @ (np.eye(k) + 0.3 * rng.normal(size=(k, k)) / np.sqrt(k))
        xa = np.c_[x, np.ones(400)]
        h, v = xa.T @ xa, rng.normal(size=(k + 1, 7))
        rows = np.arange(k).reshape(-1, q)
        limit = int(0.9 * rows.shape[0])
        fast = _obs_greedy(h, v, rows, 0.1, limit, steps=8, refresh=0.2)
        slow = _greedy_by_definition(h, v, rows, 0.1, limit, steps=8)
        np.testing.assert_allclose(fast, slow, rtol=1e-8)
