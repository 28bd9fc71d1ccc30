"""Measured sensitivity probes and the residual-stream target: oracles on tiny graphs.

1. Probes (``graphopt.prune.sensitivity.measure``) on the linear MLP of
   ``test_reconstruct``: removing the constant unit and a unit that is a combination of
   two kept ones, with the OBS compensation, leaves the outputs as they were (error ~0);
   removing two independent units (2 and 3) does not.
2. Stream target: ``x ─ W0 + b0 ─> r ─ W1 + b1 ─> y; s = y + r`` where the "pruned" copy's
   ``b0`` is off by δ (an upstream error). Refitting the site ``W1`` toward the original's
   *stream* ``s`` (``streams=True``) repairs it exactly (the bias absorbs −δ·W1 − δ); the
   plain target (the site's own output) cannot, since the residual carries δ past it.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphopt.analysis.coupling import analyze
from graphopt.data.gram import constants
from graphopt.prune.reconstruct import reconstruct
from graphopt.prune.scores import _consumers
from graphopt.prune.sensitivity import Probe, measure
from graphopt.testing import make_model, run

from .test_reconstruct import _feeds, _mlp


def test_probes_measure_zero_for_linear_units_and_more_for_others():
    model = _mlp()
    coupling = analyze(model, {"x": (16, 8)})
    group = next(g for g in coupling.groups if g.prunable and g.size == 6)
    consumers = {group.id: _consumers(model, coupling, group, constants(model))}
    key = ("group", group.id)
    err = [measure(model, coupling, [Probe(key, np.array(units))], _feeds((16, 8), count=4),
                   consumers, damping=1e-9)[key] for units in ([4, 5], [2, 3])]
    assert err[0] < 1e-9
    assert err[1] > 1e-3


def _residual(delta: float = 0.0) -> onnx.ModelProto:
    rng = np.random.default_rng(4)
    inits = {"W0": rng.normal(size=(4, 4)).astype(np.float32),
             "b0": (rng.normal(size=4) + delta).astype(np.float32),
             "W1": rng.normal(size=(4, 4)).astype(np.float32),
             "b1": rng.normal(size=4).astype(np.float32)}
    if delta:
        inits["b0"] = (numpy_helper.to_array(_residual().graph.initializer[1]) + delta
                       ).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W0"], ["r0"]),
             helper.make_node("Add", ["r0", "b0"], ["r"]),
             helper.make_node("MatMul", ["r", "W1"], ["y0"]),
             helper.make_node("Add", ["y0", "b1"], ["y"]),
             helper.make_node("Add", ["y", "r"], ["s"])]
    return make_model(nodes, {"x": ["n", 4]}, ["s"], inits)


def test_stream_target_repairs_an_upstream_error_the_plain_target_cannot():
    original = _residual()
    feeds = _feeds((32, 4), count=3)
    held = _feeds((32, 4), count=2, seed=9)
    diffs = {}
    for streams in (False, True):
        pruned = _residual(delta=0.5)
        fits, skipped = reconstruct(original, pruned, ["y0"], feeds, damping=0.1,
                                    streams=streams)
        assert fits and not skipped
        diffs[streams] = max(float(np.abs(run(original, f)["s"] - run(pruned, f)["s"]).max())
                             for f in held)
    assert diffs[True] < 1e-4
    assert diffs[False] > 0.1


def _refit_error(model, feeds, fit_on, measure_on, keep):
    """Oracle for a probe removing the hidden units outside ``keep`` of ``_mlp``: fc2 and its
    bias refit by numpy lstsq on the feeds ``fit_on``, each feed of ``measure_on`` scored
    with the fit of its own list; relative squared error of ``y`` over ``measure_on``."""
    init = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}

    def rows(fs):
        h = np.concatenate([f["x"].astype(np.float64) @ init["W1"] + init["b1"] for f in fs])
        return np.c_[h[:, keep], np.ones(len(h))], h @ init["W2"] + init["b2"]

    num = den = 0.0
    for fit, scored in zip(fit_on, measure_on):
        v = np.linalg.lstsq(*rows(fit), rcond=None)[0]
        x, y = rows(scored)
        num += float(((x @ v - y) ** 2).sum())
        den += float((y * y).sum())
    return num / den


def test_cross_fitted_probe_equals_a_refit_on_the_other_fold_scored_on_its_own():
    """``measure(folds=)``: each fold's feeds are scored with the compensation solved on the
    other fold (oracle: numpy lstsq of the kept units on that fold); without folds, fit and
    score on all feeds. The cross-fitted damage is the larger (held-out rows), so the two
    are not the same number by construction."""
    model = _mlp(dependent=False)
    coupling = analyze(model, {"x": (16, 8)})
    group = next(g for g in coupling.groups if g.prunable and g.size == 6)
    consumers = {group.id: _consumers(model, coupling, group, constants(model))}
    key = ("group", group.id)
    feeds = _feeds((6, 8), count=4)
    probe = [Probe(key, np.array([1, 2, 3]))]
    keep = [0, 4, 5]
    crossed = measure(model, coupling, probe, feeds, consumers, damping=1e-9,
                      folds=[0, 1, 0, 1])[key]
    inside = measure(model, coupling, probe, feeds, consumers, damping=1e-9)[key]
    a, b = [feeds[0], feeds[2]], [feeds[1], feeds[3]]
    assert np.isclose(crossed, _refit_error(model, feeds, [b, a], [a, b], keep), rtol=1e-4)
    assert np.isclose(inside, _refit_error(model, feeds, [feeds], [feeds], keep), rtol=1e-4)
    assert crossed > 1.2 * inside
