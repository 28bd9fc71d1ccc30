"""The refit's damping by cross-validation on per-fold Gram sums (``graphopt.prune.reconstruct.choose_damping``),
and the ``prune`` defaults that choose from data: ``cv``, ``max_ratio`` unset.

Oracles: fold sums add up to one accumulation; the chosen λ and its held-out errors equal a
hand computation (numpy ridge on the raw rows of each training fold, scored on the other);
targets unrelated to the inputs (pure noise) make λ = ∞ win, i.e. the cut weights stay.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import helper

from graphopt.api import optimize
from graphopt.core.registry import build_pass
from graphopt.data.gram import GramStats, accumulate, linear_sites
from graphopt.errors import ConfigError
from graphopt.prune.reconstruct import GRID, choose_damping
from graphopt.testing import make_model

from .test_budget import _feeds, _mlp


def _stats(xs, ts):
    k, n = xs[0].shape[1], ts[0].shape[1]
    parts = []
    for x, t in zip(xs, ts):
        p = GramStats(np.zeros((k + 1, k + 1)), np.zeros((k + 1, n)))
        p.add(x, t)
        parts.append(p)
    return GramStats.total(parts)


def _by_hand(xs, ts, w0, lam):
    """Σ_f held-out error of ridge toward w0 fit on the other folds (bias undamped,
    λ scaled by the training rows' mean diag XᵀX, as ``solve``)."""
    total = 0.0
    for f in range(len(xs)):
        x = np.concatenate([xs[g] for g in range(len(xs)) if g != f])
        t = np.concatenate([ts[g] for g in range(len(xs)) if g != f])
        a = np.c_[x, np.ones(len(x))]
        if math.isinf(lam):
            w, b = w0, (t - x @ w0).mean(0)
        else:
            d = lam * np.mean(np.sum(x * x, 0)) * np.r_[np.ones(x.shape[1]), 0.0]
            v = np.linalg.solve(a.T @ a + np.diag(d), a.T @ t + d[:, None] *
                                np.r_[w0, np.zeros((1, w0.shape[1]))])
            w, b = v[:-1], v[-1]
        total += float(((xs[f] @ w + b - ts[f]) ** 2).sum())
    return total


def test_fold_sums_add_up_to_one_accumulation():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")],
                       {"x": ["n", 4]}, ["y"], {"W": w})
    feeds = [{"x": rng.normal(size=(7, 4)).astype(np.float32)} for _ in range(5)]
    sites = list(linear_sites(model).values())
    whole = accumulate(model, sites, feeds, targets=True, max_rows=None)["y"]
    folded = accumulate(model, sites, feeds, targets=True, max_rows=None,
                        folds=[0, 1, 0, 1, 0])["y"]
    assert len(folded.parts) == 2 and [p.n for p in folded.parts] == [21, 14]
    np.testing.assert_allclose(folded.xtx, whole.xtx, rtol=1e-12)
    np.testing.assert_allclose(folded.xty, whole.xty, rtol=1e-12)
    assert folded.n == whole.n and folded.tt == pytest.approx(whole.tt)


def test_cross_validated_damping_matches_a_hand_computation():
    """Few rows, many inputs, noisy targets: an intermediate λ wins, and every candidate's
    held-out error equals numpy's ridge on the raw fold rows."""
    rng = np.random.default_rng(1)
    w_true = rng.normal(size=(12, 2))
    w0 = w_true + 0.3 * rng.normal(size=(12, 2))
    xs = [rng.normal(size=(15, 12)) for _ in range(3)]
    ts = [x @ w_true + 0.7 + 1.5 * rng.normal(size=(15, 2)) for x in xs]
    lam, errors = choose_damping(_stats(xs, ts), w0, np.zeros(2), 0.1)
    for cand, err in errors.items():
        assert err == pytest.approx(_by_hand(xs, ts, w0, cand), rel=1e-8)
    hand = {0.1 * f: _by_hand(xs, ts, w0, 0.1 * f) for f in GRID}
    assert lam == min(hand, key=hand.get)
    assert set(errors) == set(hand)


def test_noise_targets_keep_the_cut_weights():
    """Targets that are W₀'s output plus noise the inputs cannot predict: any refit of W
    fits noise, so held-out λ = ∞ (W₀, bias only) wins."""
    rng = np.random.default_rng(2)
    w0 = rng.normal(size=(10, 3))
    xs = [rng.normal(size=(12, 10)) for _ in range(4)]
    ts = [x @ w0 + 2.0 * rng.normal(size=(12, 3)) for x in xs]
    lam, errors = choose_damping(_stats(xs, ts), w0, np.zeros(3), 0.1)
    assert math.isinf(lam), errors
    one = GramStats(np.zeros((11, 11)), np.zeros((11, 3)))
    one.add(xs[0], ts[0])
    assert choose_damping(GramStats.total([one]), w0, np.zeros(3), 0.1) is None


@pytest.mark.parametrize("keep,cap", [(0.5, 3), (0.34, 4)])
def test_unset_max_ratio_takes_half_unless_the_budget_needs_more(keep, cap):
    """max_ratio unset: a group loses at most half its units when that meets the budget
    (6 hidden units: 3; macs=0.34 needs 4 of them), else up to 0.9, and the report says so."""
    _, report = optimize(_mlp(), [f"prune:macs={keep},cv=2"], calibration=_feeds(),
                         input_shapes={"x": (16, 8)})
    entry = report.passes[0]
    removed = entry.counters["neurons_removed"]
    assert removed == cap
    noted = any("max_ratio 0.5 cannot meet" in n for n in entry.details["notes"])
    assert noted == (cap > 3)
    fits = entry.details["reconstruction"]
    assert fits and all("damping" in f for f in fits)  # chosen by 2-fold CV


@pytest.mark.parametrize("options", [{"macs": 0.5, "cv": 1}, {"macs": 0.5, "cv": -2},
                                     {"macs": 0.5, "max_ratio": 1.0}])
def test_bad_cv_and_ratio_are_refused(options):
    with pytest.raises(ConfigError):
        build_pass("prune", options)
