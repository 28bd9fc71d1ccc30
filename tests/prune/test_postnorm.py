"""Post-norm row weights (``graphopt.prune.postnorm``): oracles on a tiny post-LN block.

    x[n,8] ─ W1[8,6] ─ +b1 ─ Relu ─ W2[6,8] (fc2) ─ +b2 ─ + x ─> s ─ LayerNorm ─> y

A few input rows are scaled ×25 ("massive" tokens, as in BERT's stream): the norm divides
their error away, so a refit weighted by 1 / var(s) fits the other rows better.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from graphopt.data.gram import GramStats, accumulate, linear_sites
from graphopt.prune.postnorm import norm_streams
from graphopt.prune.reconstruct import solve, stream_sums
from graphopt.testing import make_model, run


def _block(extra_reader: bool = False, linear: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(4)
    init = {"W1": rng.normal(size=(8, 6)).astype(np.float32),
            "b1": rng.normal(size=6).astype(np.float32),
            "W2": rng.normal(size=(6, 8)).astype(np.float32),
            "b2": rng.normal(size=8).astype(np.float32),
            "g": (1 + 0.1 * rng.normal(size=8)).astype(np.float32),
            "beta": (0.1 * rng.normal(size=8)).astype(np.float32)}
    if linear:  # h5 = h0 + 2·h1, h4 = 3: both can go with an exact refit
        init["W1"][:, 5] = init["W1"][:, 0] + 2 * init["W1"][:, 1]
        init["b1"][5] = init["b1"][0] + 2 * init["b1"][1]
        init["W1"][:, 4], init["b1"][4] = 0, 3
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h0"], name="fc1"),
             helper.make_node("Add", ["h0", "b1"], ["h1"]),
             helper.make_node("Identity" if linear else "Relu", ["h1"], ["h"]),
             helper.make_node("MatMul", ["h", "W2"], ["y0"], name="fc2"),
             helper.make_node("Add", ["y0", "b2"], ["y1"]),
             helper.make_node("Add", ["y1", "x"], ["s"]),
             helper.make_node("LayerNormalization", ["s", "g", "beta"], ["y"], axis=-1)]
    outputs = ["y", "s"] if extra_reader else ["y"]
    return make_model(nodes, {"x": ["n", 8]}, outputs, init)


def _feeds(count=3, seed=5):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        x = rng.normal(size=(16, 8)).astype(np.float32)
        x[:2] *= 25.0
        out.append({"x": x})
    return out


def _numpy(model, x):
    w = {i.name: onnx.numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    h = np.maximum(x @ w["W1"] + w["b1"], 0)
    return h, h @ w["W2"] + w["b2"] + x


def test_norm_streams_finds_the_post_norm_sum_only():
    model = _block()
    sums = stream_sums(model, ["y0", "h0"])
    assert sums == {"y0": "s"}  # h0 joins no residual sum
    assert norm_streams(model, sums) == {"y0": "s"}
    assert norm_streams(_block(extra_reader=True), sums) == {}  # s is read elsewhere too


def test_weighted_gram_and_refit_are_the_weighted_least_squares():
    model, feeds = _block(), _feeds()
    site = linear_sites(model)["y0"]
    stats = accumulate(model, [site], feeds, targets=True, weights={"y0": "s"})["y0"]
    xs, ws = [], []
    for f in feeds:
        x = f["x"].astype(np.float64)
        h, s = _numpy(model, x)
        xs.append(np.c_[h, np.ones(len(h))])
        ws.append(1.0 / s.var(axis=1))
    xa, w = np.concatenate(xs), np.concatenate(ws)
    np.testing.assert_allclose(stats.xtx, (xa * w[:, None]).T @ xa, rtol=1e-5)
    assert stats.n == len(xa)
    # λ = 0: the solve is numpy's lstsq on rows scaled by sqrt(w) (noisy targets, so the
    # weighted and the plain fits differ)
    rng = np.random.default_rng(6)
    t = xa[:, :-1] @ rng.normal(size=(6, 8)) + rng.normal(size=(len(xa), 8))
    own = GramStats(np.zeros((7, 7)), np.zeros((7, 8)))
    own.add(xa[:, :-1], t, w)
    fit_w, fit_b = solve(own, np.zeros((6, 8)), np.zeros(8), "lstsq", 0.0)
    sw = np.sqrt(w)[:, None]
    ref = np.linalg.lstsq(xa * sw, t * sw, rcond=None)[0]
    np.testing.assert_allclose(np.r_[fit_w, fit_b[None]], ref, atol=1e-6)
    plain = np.linalg.lstsq(xa, t, rcond=None)[0]
    assert np.abs(plain - ref).max() > 1e-2  # the weights matter here
    bias_only = solve(own, np.zeros((6, 8)), np.zeros(8), "bias", 0.0)[1]
    np.testing.assert_allclose(bias_only, (w[:, None] * t).sum(0) / w.sum(), atol=1e-9)


def test_prune_with_postnorm_keeps_the_exact_refit_oracle():
    """``prune:...,postnorm=true`` end to end: the weighted scores still pick units that
    are linear in the others (damage 0) and the weighted refit reproduces the outputs."""
    from graphopt.core.contract import Context
    from graphopt.core.manager import PassManager
    from graphopt.core.registry import build_pass

    model, feeds = _block(linear=True), _feeds()
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    step = build_pass("prune", {"macs": 0.7, "kinds": ("neurons",), "postnorm": True,
                                "damping": 1e-9})
    pruned, report = PassManager([step]).run(copy, Context(calibration=feeds))
    assert report.ok, report.passes[0].error
    (removed,) = [set(u.tolist()) for u in report.passes[0].plan.removal.values()]
    assert 4 in removed and len(removed & {0, 1, 5}) == 1, removed
    held_out = _feeds(seed=9)
    diff = max(float(np.abs(run(model, f)["y"] - run(pruned, f)["y"]).max()) for f in held_out)
    assert diff < 1e-4
